"""``piip eval TASK``: each task module listed in TASKS provides ``add_eval_parser(subparsers)``."""
from __future__ import annotations

import argparse
import importlib

TASKS = ["piip.commands.detection"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained task model (detection, ...)")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    for path in TASKS:
        importlib.import_module(path).add_eval_parser(tasks)
    p.set_defaults(func=lambda args: p.print_help() or 2)
