"""The ``piip`` command line. Each sub-command lives in its own module exposing
``add_parser(subparsers)`` which registers it and sets ``func``; list it in ``COMMANDS``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# module paths providing sub-commands, in --help order
COMMANDS = [
    "piip.commands.demo",
    "piip.commands.models",
    "piip.commands.convert",
    "piip.commands.flops",
    "piip.commands.train", "piip.commands.eval", "piip.commands.predict",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piip", description="Parameter-Inverted Image Pyramid Networks")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"piip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMANDS:
        importlib.import_module(path).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime import tune_malloc
    tune_malloc()   # page-fault-free reuse of large activations (PIIP_TUNE_MALLOC=0 to opt out)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"piip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
