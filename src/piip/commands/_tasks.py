"""Shared shape of ``piip train TASK`` and ``piip eval TASK``: one sub-command per task module."""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Optional, Sequence

from ..tasks.registry import TASKS as VISION_TASKS

# one command module per task (piip.tasks.registry.TASKS, then PIIP-LLaVA); each provides
# add_train_parser(subparsers) and add_eval_parser(subparsers)
TASKS = [f"piip.commands.{name}" for name in VISION_TASKS] + ["piip.commands.llava"]


def add_task_command(sub: argparse._SubParsersAction, name: str, help: str, hook: str) -> None:
    """Register ``piip NAME TASK ...`` where every task module's ``hook`` adds its TASK parser."""
    p = sub.add_parser(name, help=help)
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    for path in TASKS:
        getattr(importlib.import_module(path), hook)(tasks)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def check_eval_classes(names: Optional[Sequence[str]], dataset_names: Sequence[str], model_count: int,
                       dataset_count: int) -> None:
    """``piip eval TASK``: the checkpoint's classes must be the dataset's (by name when the checkpoint
    stored its names, by count always)."""
    if names and list(names) != list(dataset_names):
        raise ValueError(f"the checkpoint's classes {list(names)[:5]}... differ from the dataset's "
                         f"{list(dataset_names)[:5]}...")
    if model_count != dataset_count:
        raise ValueError(f"model has {model_count} classes, dataset {dataset_count}")


def eval_out_dir(args: argparse.Namespace) -> str:
    """``--out-dir``, or ``eval/`` next to the evaluated checkpoint."""
    return args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
