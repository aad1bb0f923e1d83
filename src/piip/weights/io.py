"""Reading state dicts from files and strict, loud loading into modules."""
from __future__ import annotations

import os
import pickle
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

# wrappers released checkpoints put around the weights (mmdet: state_dict, DeiT/PIIP cls: model, deepspeed: module)
_WRAPPERS = ("state_dict", "model", "module", "model_ema")


def read_checkpoint(path: str, weights_only: bool = True, map_location: object = "cpu",
                    consolidate_shards: bool = True, mmap: bool = False) -> object:
    """The object stored in a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file.

    An FSDP run's ``checkpoint.pt`` gets its ``model`` weights gathered from the shards folder beside it
    (``consolidate_shards``; resuming reads the shards itself). ``mmap``: torch files' tensors are
    mapped, not read (for a caller that only looks at the small entries; the legacy non-zip format
    cannot be mapped and fails as unreadable).
    Every way a file can be unusable (missing, a folder, truncated, not a checkpoint, pickled
    Python objects under ``weights_only``) becomes one ValueError / FileNotFoundError naming the file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"checkpoint {path!r} {what}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path!r} cannot be read as safetensors (truncated or not a safetensors "
                             f"file): {e}") from None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        if weights_only and "global" in str(e).lower():
            raise ValueError(f"checkpoint {path!r} holds pickled Python objects besides tensors, which the safe "
                             "loader refuses; if you trust the file, read it with "
                             "piip.weights.read_state_dict(path, weights_only=False)") from None
        raise ValueError(f"checkpoint {path!r} is corrupt or not a torch checkpoint ({e})") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"checkpoint {path!r} is truncated or not a torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); use an intact copy") from None
    if consolidate_shards and isinstance(obj, dict) and obj.get("model") == "sharded" and "shards" in obj:
        # an FSDP training run's checkpoint.pt: the weights are in the shards folder beside it
        from ..engine.fsdp import read_sharded_model
        obj = {**obj, "model": read_sharded_model(os.path.join(os.path.dirname(os.path.abspath(path)), obj["shards"]))}
    return obj


def carried_config(path: str) -> Optional[tuple[str, dict]]:
    """(model name, ``PIIPConfig.to_dict()``) stored in a piip ``.safetensors`` file's metadata (written by
    ``piip convert official`` and :func:`~piip.weights.save_pretrained`), or None for any other file.
    Only the header is read."""
    path = os.fspath(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    import json

    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None   # the weight reader reports what is wrong with the file
    if meta.get("library") != "piip" or "config" not in meta:
        return None
    try:
        cfg = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path!r}: its 'config' metadata is not valid JSON ({e})") from None
    return str(meta.get("model") or ""), cfg


def _numpy_array_globals() -> list:
    """What plain numpy arrays pickle to (piip 0.1 training checkpoints held the numpy RNG state):
    data only, no code, so the safe loader may rebuild them."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_state_dict(path: str, weights_only: bool = True) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file, unwrapped from ``state_dict``/``model``/``module``.

    ``weights_only=True`` refuses arbitrary pickled objects; pass False only for files you trust.
    A piip training checkpoint's detector weights are returned with their ``backbone.body.`` names.
    """
    return unwrap_state_dict(read_checkpoint(path, weights_only), os.fspath(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Descend through the usual wrapper keys until a flat name -> tensor mapping is reached."""
    while isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise ValueError(f"{source}: no state dict found (expected a mapping of tensors, possibly under one of "
                     f"{list(_WRAPPERS)})")


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, sd: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise a ValueError naming every missing key, unexpected key and shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes, 10)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


def strict_load(module: nn.Module, sd: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Check, then copy every tensor (cast to the module's dtype/device)."""
    check_state_dict(module, sd, source)
    module.load_state_dict(dict(sd), strict=True)


PIIP_DETECTOR_BACKBONE = "backbone.body."


def piip_backbone_part(sd: Mapping[str, Tensor]) -> Optional[dict[str, Tensor]]:
    """The backbone tensors of a piip detector state dict (``backbone.body.*``, e.g. a training
    checkpoint's ``model``) under backbone names, or None when ``sd`` is not in that layout."""
    if not any(k.startswith(PIIP_DETECTOR_BACKBONE) for k in sd):
        return None
    return {k[len(PIIP_DETECTOR_BACKBONE):]: v for k, v in sd.items() if k.startswith(PIIP_DETECTOR_BACKBONE)}
