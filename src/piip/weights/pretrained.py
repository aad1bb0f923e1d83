"""Our own format: ``DIR/model.safetensors`` + ``DIR/config.json`` (``PIIPConfig.to_dict()``)."""
from __future__ import annotations

import json
import os
from typing import Callable

from torch import nn

from ..config import PIIPConfig
from .io import read_state_dict, strict_load

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_state_dict(model: nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """All tensors of ``model`` to one safetensors file (contiguous CPU copies; shared tensors duplicated)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata=metadata)


def save_pretrained(model: nn.Module, directory: str) -> None:
    """Write ``model.safetensors`` and ``config.json``; :func:`piip.from_pretrained` rebuilds the same model."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, PIIPConfig):
        raise ValueError(f"save_pretrained needs a piip model with a PIIPConfig at .cfg, got {type(model).__name__}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    # the config also travels inside the weights file: create_model(checkpoint=...) rebuilds from it alone
    save_state_dict(model, os.path.join(directory, WEIGHTS_NAME),
                    metadata={"format": "pt", "library": "piip", "config": json.dumps(cfg.to_dict())})


def load_pretrained(directory: str, build: Callable[[PIIPConfig], nn.Module]) -> nn.Module:
    """The model saved by :func:`save_pretrained`, made by ``build`` from its config (``piip.from_pretrained``
    passes the registry's ``build_from_config``), with its weights loaded strictly."""
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: from_pretrained expects a directory written by save_pretrained")
    with open(cfg_path) as f:
        cfg = PIIPConfig.from_dict(json.load(f))
    model = build(cfg)
    strict_load(model, read_state_dict(w_path), w_path)
    return model
