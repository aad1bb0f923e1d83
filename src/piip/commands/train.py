"""``piip train TASK`` (tasks are listed in :mod:`piip.commands._tasks`)."""
from __future__ import annotations

import argparse

from ._tasks import add_task_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_task_command(sub, "train", "train a task model (detection, ...)", "add_train_parser")
