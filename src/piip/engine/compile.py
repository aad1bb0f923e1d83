"""``torch.compile`` for training and inference: compile the PIIP backbones of a model in place.

Why the backbones and not the whole model: they are where the time goes, and their graph has no
host syncs (one graph, ``fullgraph=True`` holds); detection / segmentation heads do data-dependent
work (box sampling, NMS, matching) that would only add graph breaks and recompiles.
``nn.Module.compile`` compiles in place, so state-dict keys, checkpoints, DDP / EMA and ``unwrap``
see the same modules as without compiling.
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["maybe_compile", "compile_targets"]


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The outermost PIIP backbones inside ``model`` (the model itself when it is one)."""
    from ..backbone import PIIPBackbone
    found: list[nn.Module] = []
    skip: set[int] = set()
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, PIIPBackbone):
            found.append(m)
            skip.update(id(c) for c in m.modules())
    return found


def maybe_compile(model: nn.Module, enabled: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Compile every PIIP backbone of ``model`` in place (``enabled=False``: nothing); returns ``model``.

    ``compile_kwargs`` go to :func:`torch.compile` (default: inductor, dynamic shapes after the first
    change of size). A model without a PIIP backbone is an error rather than a silent no-op.
    Gradients equal eager ones, except where randomness is drawn: drop paths (stochastic depth) and
    dropout sample other masks under Inductor's RNG (docs/deploy.md, "Compiled training")."""
    if not enabled:
        return model
    targets = compile_targets(model)
    if not targets:
        raise ValueError(f"--compile: {type(model).__name__} holds no PIIP backbone to compile")
    for m in targets:
        m.compile(**compile_kwargs)
    return model
