"""Reading state dicts from files and strict, loud loading into modules."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

# wrappers released checkpoints put around the weights (mmdet: state_dict, DeiT/PIIP cls: model, deepspeed: module)
_WRAPPERS = ("state_dict", "model", "module", "model_ema")


def read_state_dict(path: str, weights_only: bool = True) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file, unwrapped from ``state_dict``/``model``/``module``.

    ``weights_only=True`` refuses arbitrary pickled objects; pass False only for files you trust.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return dict(load_file(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # pickle errors have many types
        raise ValueError(f"could not read {path!r} with torch.load(weights_only={weights_only}): {e}. If the file "
                         "is trusted, read it with piip.weights.read_state_dict(path, weights_only=False)") from e
    return unwrap_state_dict(obj, path)


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
