"""Command-line options generated from a task config dataclass, so each default is written once:
a field whose ``metadata['cli']`` names an option group becomes ``--field-name`` (validated as a
number of the field's type, see :func:`_validator`, or one of ``metadata['choices']``) with the
field's default and ``metadata['help']``. Fields are declared with :func:`piip.config.cli_field`."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from ._model_args import non_negative_float, non_negative_int, positive_float, positive_int, unit_float

def _validator(f: dataclasses.Field) -> Callable[[str], Any]:
    """The parser of a field's option: a positive number of its type; ``minimum=0`` allows 0,
    ``maximum=1`` (floats) means a fraction in [0, 1]."""
    floor0 = f.metadata.get("minimum") == 0
    if str(f.type) == "float":
        return unit_float if f.metadata.get("maximum") == 1 else non_negative_float if floor0 else positive_float
    return non_negative_int if floor0 else positive_int


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
            kw["type"] = _validator(f)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_args(args: argparse.Namespace, cls: type, *groups: str) -> dict[str, Any]:
    """``{field: parsed value}`` of the options :func:`add_config_args` added for ``groups``."""
    return {f.name: getattr(args, f.name) for g in groups for f in cli_fields(cls, g)}
