"""Branch merging: every branch's final map -> one width, upsampled to the finest grid, summed."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops.resize import bilinear
from ..ops.symbolic import same_sizes
from .conv import Conv2d
from .linear import apply_linear


class _TokenNormLinear(nn.Module):
    """The paper's light merge on a (B, C, H, W) map: LayerNorm -> Linear -> LayerNorm over C.

    A branch already at the output width is only normalised (as in the released code), which
    is what makes the merge cost ~0.3M parameters for PIIP-B (Table X).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim, eps=1e-6)
        if in_dim != out_dim:
            self.proj = nn.Linear(in_dim, out_dim)
            self.norm_out = nn.LayerNorm(out_dim, eps=1e-6)
        else:
            self.proj = self.norm_out = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_in(x.permute(0, 2, 3, 1))
        if self.proj is not None:
            x = self.norm_out(apply_linear(self.proj, x))
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (no weights), so a Sequential keeps the released indices."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def _gn_linear_merge(in_dim: int, out_dim: int) -> nn.Module:
    """The released classification merge: GroupNorm(32) for the widest branch, else
    GroupNorm(32) -> Linear over channels -> GroupNorm(32) (keys 0 / 2 / 4 as released)."""
    for d in (in_dim, out_dim):
        if d % 32:
            raise ValueError(f"gn_linear merging uses GroupNorm(32): width {d} must be a multiple of 32")
    if in_dim == out_dim:
        return nn.GroupNorm(32, out_dim)
    return nn.Sequential(nn.GroupNorm(32, in_dim), Permute(0, 2, 3, 1), nn.Linear(in_dim, out_dim),
                         Permute(0, 3, 1, 2), nn.GroupNorm(32, out_dim))


def _conv_merge(in_dim: int, out_dim: int) -> nn.Sequential:
    """The released detection code's merge: 2 x (3x3 conv, GroupNorm(32), ReLU)."""
    return nn.Sequential(
        Conv2d(in_dim, out_dim, 3, padding=1, bias=False), nn.GroupNorm(32, out_dim), nn.ReLU(inplace=True),
        Conv2d(out_dim, out_dim, 3, padding=1, bias=False), nn.GroupNorm(32, out_dim), nn.ReLU(inplace=True),
    )


def _single_conv_merge(in_dim: int, out_dim: int, conv: bool) -> nn.Sequential:
    """The released regular-FPN merge: 3x3 conv (only when ``conv``), GroupNorm(32), ReLU."""
    layers = [Conv2d(in_dim, out_dim, 3, padding=1, bias=False)] if conv else []
    return nn.Sequential(*layers, nn.GroupNorm(32, out_dim), nn.ReLU(inplace=True))


class BranchMerge(nn.Module):
    """Project each branch to ``out_dim``, upsample bilinearly to branch 0's grid, weighted sum.

    kind ``linear``: LayerNorm + Linear + LayerNorm (paper). kind ``gn_linear``: the released
    classification code's GroupNorm(32) + Linear + GroupNorm. kind ``conv``: released detection
    variant. kind ``regular_fpn``: the released hybrids' merge, one conv + GroupNorm + ReLU per
    branch, GroupNorm + ReLU only for the last (largest) branch, whose width is the output's.
    The weights are learnable scalars initialised to 1.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, kind: str = "conv") -> None:
        super().__init__()
        if kind == "conv":
            if out_dim % 32:
                raise ValueError(f"conv merging uses GroupNorm(32): out width {out_dim} must be a multiple of 32")
            self.projs = nn.ModuleList(_conv_merge(d, out_dim) for d in in_dims)
        elif kind == "regular_fpn":
            if out_dim % 32 or in_dims[-1] != out_dim:
                raise ValueError(f"regular_fpn merging maps every branch to the last branch's width ({in_dims[-1]}) "
                                 f"with GroupNorm(32): got out width {out_dim}, which must equal it and be a "
                                 "multiple of 32")
            last = len(in_dims) - 1
            self.projs = nn.ModuleList(_single_conv_merge(d, out_dim, i != last) for i, d in enumerate(in_dims))
        elif kind == "linear":
            self.projs = nn.ModuleList(_TokenNormLinear(d, out_dim) for d in in_dims)
        elif kind == "gn_linear":
            self.projs = nn.ModuleList(_gn_linear_merge(d, out_dim) for d in in_dims)
        else:
            raise ValueError(f"merge must be 'conv', 'linear', 'gn_linear', 'regular_fpn' or None, got {kind!r}")
        self.kind = kind
        self.weights = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in in_dims)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        out = None
        for x, proj, w in zip(maps, self.projs, self.weights):
            x = proj(x)
            # symbolic sizes (export) compare without a guard: resizing an equal size is exact anyway
            if not same_sizes(x.shape[-2:], size):
                x = bilinear(x.float(), (size[0], size[1])).to(x.dtype)
            out = x * w if out is None else torch.addcmul(out, x, w)    # one pass, not a product and a sum
        return out
