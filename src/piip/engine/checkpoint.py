"""Atomic, resumable training checkpoints (model, optimizer, scheduler, counters, RNG states).

A checkpoint holds tensors and plain Python data only (no numpy objects), so torch's safe
``weights_only`` loader reads it and it can be handed to anything that takes a checkpoint.
"""
from __future__ import annotations

import glob
import os
import random
import tempfile
import warnings
from typing import Any, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices): call before building the model so that a
    given seed also fixes the initial weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # written by piip 0.1 (a numpy tuple)
        np.random.set_state(n)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers and arrays -> tensors, recursively (safe-loader friendly)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def check_writable(directory: str, flag: str = "--output-dir") -> None:
    """Fail now, not after an epoch, if checkpoints cannot be written to ``directory``.

    Creates nothing: probes the folder itself if it exists, else its nearest existing parent."""
    path = os.path.abspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {directory!r} is a file, not a folder; choose another path")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {directory!r} cannot be created: {probe!r} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".piip-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {directory!r} is not writable ({probe!r}: {e.strerror or e}); choose a folder "
                         "you can write to") from None


def resume_path(arg: Optional[str], output_dir: str, flag: str = "--resume") -> Optional[str]:
    """The checkpoint file ``--resume ARG`` names: a checkpoint file, a run folder (its checkpoint.pt), or
    'auto' (``output_dir``/checkpoint.pt when it exists, else None: start fresh). A missing file, or a
    folder holding only a half-written checkpoint (``checkpoint.pt.tmp*`` of a run stopped while
    saving), is refused before anything is written."""
    if not arg:
        return None
    if arg != "auto" and not os.path.isdir(arg):
        if not os.path.isfile(arg):
            raise FileNotFoundError(f"{flag} {arg!r} does not exist (give a checkpoint.pt, its run folder, or 'auto')")
        return arg
    path = os.path.join(output_dir if arg == "auto" else arg, "checkpoint.pt")
    if os.path.isfile(path):
        return path
    half = sorted(glob.glob(glob.escape(path) + ".tmp*"))
    if arg == "auto":
        if half:
            warnings.warn(f"{half[0]} is a half-written checkpoint (a run stopped while saving); starting fresh",
                          stacklevel=2)
        return None
    if half:
        raise ValueError(f"{flag} {arg!r} holds only a half-written checkpoint ({os.path.basename(half[0])}, left by "
                         "a run stopped while saving) and no checkpoint.pt: nothing to resume from; start without "
                         "--resume, or give a complete checkpoint")
    raise FileNotFoundError(f"{flag} {arg!r} is a folder without checkpoint.pt; give a checkpoint file or its run folder")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash while
    writing never leaves a truncated checkpoint behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(to_plain(obj), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """A piip training checkpoint, read with the safe loader; one clear error for anything else."""
    from ..weights.io import read_checkpoint
    ckpt = read_checkpoint(path, weights_only=True, map_location=map_location, consolidate_shards=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "optimizer" not in ckpt:
        raise ValueError(f"{path} is not a piip training checkpoint (no 'model'/'optimizer' entries); --resume "
                         "takes the checkpoint.pt a training run wrote")
    return ckpt
