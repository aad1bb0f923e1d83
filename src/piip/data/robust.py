"""One policy for unreadable samples, shared by the datasets: report each bad file once, then
substitute the next readable sample (training), return None (evaluation), or raise."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, TypeVar

from ..errors import RunFailed

T = TypeVar("T")
ON_ERROR = ("substitute", "none", "raise")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def load_or_substitute(index: int, size: int, load: Callable[[int], T], describe: Callable[[int], str],
                       bad: set[int], on_error: str, where: str,
                       fatal: tuple[type[BaseException], ...] = ()) -> Optional[tuple[int, T]]:
    """``(i, load(i))`` for ``index`` or, when it cannot be read, the next readable index (at most
    20 tries). ``bad`` remembers failed indices so each is reported once; ``fatal`` errors (a user
    error in the data, not a bad file) always propagate. ``on_error='none'`` returns None for a bad
    sample, ``'raise'`` re-raises."""
    for attempt in range(min(size, 20)):
        i = (index + attempt) % size
        if i in bad:
            continue
        try:
            return i, load(i)
        except fatal:
            raise
        except Exception as e:  # unreadable / truncated / missing file
            bad.add(i)
            warnings.warn(f"skipping unreadable {describe(i)}: {type(e).__name__}: {e}", stacklevel=3)
            if on_error == "raise":
                raise
            if on_error == "none":
                return None
    raise RuntimeError(f"no readable sample found near index {index}; check {where}")


class SampleError(RunFailed):
    """A sample's transform (augmentation) failed: names the sample, the failing step and the fix (exit 1)."""


def transform_sample(transform: Callable[..., T], args: tuple, sample: str) -> T:
    """``transform(*args)``; a failure becomes one :class:`SampleError` naming ``sample`` and the
    failing step (the innermost transform of ``transform`` in the traceback, or a guarded timm op)."""
    try:
        return transform(*args)
    except Exception as e:  # noqa: BLE001 - re-raised with the sample named
        from .augment import AugmentationError
        what = str(e) if isinstance(e, AugmentationError) else \
            f"transform {_failing_step(transform, e)} failed: {type(e).__name__}: {e}"
        raise SampleError(f"{sample}: {' '.join(what.split())} (check that file; for a training augmentation, "
                          "train without it, e.g. --auto-augment none)") from e


def _failing_step(transform: Callable, exc: BaseException) -> str:
    """Class name of the innermost step of ``transform`` (or of a Compose inside it) active in ``exc``'s traceback."""
    steps = {id(transform)}
    todo = [transform]
    while todo:
        for t in getattr(todo.pop(), "transforms", None) or []:
            steps.add(id(t))
            todo.append(t)
    name, tb = getattr(transform, "__name__", type(transform).__name__), exc.__traceback__
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if me is not None and id(me) in steps:
            name = type(me).__name__
        tb = tb.tb_next
    return name
