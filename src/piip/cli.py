"""The ``piip`` command line. Each sub-command lives in its own module exposing
``add_parser(subparsers)`` which registers it and sets ``func``; list it in ``COMMANDS``.

User errors end in one line on stderr and exit code 2; ``--debug`` (anywhere on the command
line, or ``PIIP_DEBUG=1``) shows the traceback instead. Command modules import heavy packages
(torchvision, timm, pycocotools) inside their functions so ``--help`` and listing stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import NoReturn, Optional, Sequence

# module paths providing sub-commands, in --help order
COMMANDS = [
    "piip.commands.demo",
    "piip.commands.models",
    "piip.commands.convert",
    "piip.commands.flops",
    "piip.commands.train", "piip.commands.eval", "piip.commands.predict",
    "piip.commands.chat",
    "piip.commands.export",
]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (sub-command parsers inherit this class)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} -h')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="piip", description="Parameter-Inverted Image Pyramid Networks",
                                     epilog="--debug (anywhere) shows full tracebacks instead of one-line errors")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"piip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMANDS:
        importlib.import_module(path).add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"piip: warning: {message}", file=file or sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PIIP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help / --version (0) and usage errors (2, message already printed)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import TrainingInterrupted, user_message
    from .runtime import tune_malloc
    tune_malloc()   # page-fault-free reuse of large activations (PIIP_TUNE_MALLOC=0 to opt out)
    name = " ".join(x for x in (args.command, getattr(args, "task", None)) if x)
    show = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as e:
        print(f"piip {name}: stopped by {e.signame} at step {e.step}; saved {e.checkpoint}. "
              f"Resume with the same command plus --resume {e.checkpoint}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"piip {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into messages
        if debug:
            raise
        code, msg = user_message(e)
        print(f"piip {name}: error: {msg}", file=sys.stderr)
        return code
    finally:
        warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
