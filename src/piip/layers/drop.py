"""Stochastic depth that imports timm only when it first drops a path.

timm's import pulls in torchvision and costs ~2 s; commands that only build or count models
(``piip models``, ``piip flops``) must not pay it. Training calls timm's own ``drop_path``.
"""
from __future__ import annotations

from torch import Tensor, nn


class DropPath(nn.Module):
    """Same behaviour, arguments and (empty) state as ``timm.layers.DropPath``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        from timm.layers import drop_path
        return drop_path(x, self.drop_prob, True, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def inactive(drop: nn.Module) -> bool:
    """``drop`` (an ``nn.Dropout``, a :class:`DropPath` or an ``nn.Identity``) passes its input
    through unchanged right now: identity, rate 0, or eval mode. Any other module counts as
    active, so a caller that would skip it calls it instead."""
    if type(drop) is nn.Identity:
        return True
    if type(drop) is nn.Dropout:
        return drop.p == 0.0 or not drop.training
    if type(drop) is DropPath:
        return drop.drop_prob == 0.0 or not drop.training
    return False
