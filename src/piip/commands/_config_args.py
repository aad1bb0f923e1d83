"""Command-line options generated from a task config dataclass, so each default is written once:
a field whose ``metadata['cli']`` names an option group becomes ``--field-name`` (validated as a
positive number of the field's type, ``metadata['minimum'] == 0`` allows 0, ``metadata['choices']``
lists the accepted words) with the field's default and ``metadata['help']``."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from ._model_args import non_negative_int, positive_float, positive_int

# annotation text (``from __future__ import annotations``) -> (validator, validator allowing 0)
_TYPES: dict[str, tuple[Callable[[str], Any], Callable[[str], Any]]] = {
    "int": (positive_int, non_negative_int), "Optional[int]": (positive_int, non_negative_int),
    "float": (positive_float, positive_float)}


def cli_fields(cls: type, group: str) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that are options of ``group``, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") == group]


def add_config_args(parser: argparse._ActionsContainer, cls: type, group: str) -> None:
    """Add one ``--name`` option per field of ``cls`` in ``group`` (see the module docstring)."""
    for f in cli_fields(cls, group):
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help")}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        else:
            kw["type"] = _TYPES[str(f.type)][f.metadata.get("minimum") == 0]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_args(args: argparse.Namespace, cls: type, *groups: str) -> dict[str, Any]:
    """``{field: parsed value}`` of the options :func:`add_config_args` added for ``groups``."""
    return {f.name: getattr(args, f.name) for g in groups for f in cli_fields(cls, g)}
