"""User-facing errors: what the CLI turns into one line and exit code 2 instead of a traceback.

Anything raised for bad input (a file, an argument, a checkpoint that does not fit) is a
``ValueError`` or an ``OSError`` with a message that names the input and says how to fix it.
:class:`TrainingInterrupted` is how a training run that saved itself on SIGINT/SIGTERM ends.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# optional package -> the extra of pyproject.toml that installs it (others: plain pip install)
EXTRAS = {"pycocotools": "detection", "skimage": "demo", "PIL": "detection", "transformers": "seg",
          "sentencepiece": "llava", "accelerate": "llava"}


class TrainingInterrupted(Exception):
    """A signal stopped training after a checkpoint was written; ``checkpoint`` resumes it."""

    def __init__(self, signame: str, checkpoint: str, step: int) -> None:
        super().__init__(f"{signame} at step {step}: saved {checkpoint}")
        self.signame, self.checkpoint, self.step = signame, checkpoint, step


class RunFailed(Exception):
    """A run failed partway (a sample, a worker, a step or an evaluation): ``str()`` is the one line
    (what failed, why, and the checkpoint to resume from), ``code`` the exit code (2 when the cause is
    bad input such as a mask value out of range, else 1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class MissingDependency(ImportError):
    """An optional package is not installed (the message says which extra installs it)."""


def install_hint(module: str) -> str:
    """How to install the package that provides ``module``."""
    top = module.split(".")[0]
    return f"pip install 'piip[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"


def require(module: str, what: str = "") -> ModuleType:
    """Import an optional package or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{what or 'this'} needs the optional package {module.split('.')[0]!r} ({e}); "
                                f"install it with: {install_hint(module)}") from None


def error_message(exc: BaseException) -> str:
    """``str(exc)`` on one line; for an error re-raised from a DataLoader worker (whose message is the
    worker's whole traceback) only the original exception's message."""
    msg = str(exc)
    lines = msg.rstrip().splitlines()
    if lines and "in DataLoader worker process" in lines[0]:
        last = max((i for i, ln in enumerate(lines) if ln.startswith(" ")), default=0)
        msg = " ".join(ln.strip() for ln in lines[last + 1:])
        for prefix in (f"{type(exc).__module__}.{type(exc).__qualname__}: ", f"{type(exc).__qualname__}: "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
    return " ".join(msg.split())


def user_message(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception reaching the CLI: 2 for user errors, 1 otherwise."""
    if isinstance(exc, MissingDependency):
        return 2, str(exc)
    if isinstance(exc, RunFailed):
        return exc.code, error_message(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return 2, (f"the optional package {exc.name.split('.')[0]!r} is not installed; install it with: "
                   f"{install_hint(exc.name)}")
    if isinstance(exc, (ValueError, OSError)):
        msg = error_message(exc) if not isinstance(exc, OSError) or not exc.filename else \
            f"{exc.filename}: {exc.strerror or exc}"
        return 2, msg.strip().replace("\n", " ")
    return 1, (f"internal error: {type(exc).__name__}: {error_message(exc)} (run again with --debug for the "
               "traceback, and please report it)")


def check_output_file(path: str, flag: str = "--out", example: str = "out.png") -> str:
    """Before any work: ``path`` names a file (not a folder) in a folder that exists and is writable;
    the folder is the user's to make. Returns the folder. Callers check their own extensions."""
    import os
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, example)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it first (mkdir -p) or "
                         "write elsewhere")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")
    return folder
