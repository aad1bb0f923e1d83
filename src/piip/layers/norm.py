"""The token norms a ViT branch can use: LayerNorm (most flavours) or RMSNorm (InternViT-6B)."""
from __future__ import annotations

from torch import nn

NORMS = ("ln", "rms")


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """``'ln'``: LayerNorm with bias; ``'rms'``: weight-only RMSNorm, as InternViT-6B (no mean removal,
    no bias); the official code's apex ``FusedRMSNorm`` computes the same function."""
    if kind == "ln":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
