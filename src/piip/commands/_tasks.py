"""Shared shape of ``piip train TASK`` and ``piip eval TASK``: one sub-command per task module."""
from __future__ import annotations

import argparse
import importlib

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
