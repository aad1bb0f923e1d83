"""ViTDet simple feature pyramid: one stride-s map -> maps at strides s/4, s/2, s, 2s."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import derived, opaque
from ..ops.linear import linear
from ..ops.symbolic import grad_wanted, tracing


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), self.normalized_shape, self.weight.float(),
                         self.bias.float(), self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


class Upsample2x(nn.ConvTranspose2d):
    """``ConvTranspose2d(c_in, c_out, 2, stride=2)`` (same parameters and keys) run as one GEMM.

    With kernel = stride = 2 every input pixel writes its own 2x2 output patch, so the op is a
    linear layer on channels-last tokens followed by a pixel shuffle. PyTorch's CPU transposed
    convolution is about 2x slower than that GEMM and returns NCHW, forcing a copy of the
    (largest) stride-4 map; this returns a channels-last (B, C, 2H, 2W) map instead.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if x.dim() != 4:
            raise ValueError(f"Upsample2x expects a (B, C, H, W) map, got shape {tuple(x.shape)}")
        if self.bias is not None and not tracing() and not grad_wanted(x, self.weight, self.bias):
            return _shuffled_gemm(x, self.weight, self.bias)
        if self.bias is not None and opaque.wanted(x, self.weight, self.bias):
            # compiled inference: the eager call as one opaque op (Inductor's loop for the shuffle
            # and bias add of PIIP-TSB's stride-4 level alone took 113 ms)
            return _upsample2x_op(x, self.weight, self.bias)
        b, c, h, w = x.shape
        # rows (i, j, c_out); autograd and tracers need the plain expression (Inductor fuses the
        # add into the reshape copy itself)
        y = linear(x.permute(0, 2, 3, 1), _gemm_weight(self.weight))          # (B, H, W, 4*C_out)
        y = y.view(b, h, w, 2, 2, self.out_channels).transpose(2, 3)         # (B, H, i, W, j, C_out)
        out = y.reshape(b, 2 * h, 2 * w, self.out_channels) if self.bias is None else \
            (y + self.bias).reshape(b, 2 * h, 2 * w, self.out_channels)
        return out.permute(0, 3, 1, 2)


def _gemm_weight(weight: Tensor) -> Tensor:
    """The (C_in, C_out, 2, 2) transposed-conv weight as GEMM rows (i, j, c_out)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])


def _shuffled_gemm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Eager inference: the GEMM on a relaid weight kept between calls (a 768-wide level copied
    2.4M weights a call, 16 ms on one core), and the bias add writing the shuffled layout directly
    (one pass). A channels-last (B, C_out, 2H, 2W) map."""
    b, c, h, w = x.shape
    cout = weight.shape[1]
    rows = derived.cached("upsample2x", (weight,), lambda: _gemm_weight(weight))
    y = linear(x.permute(0, 2, 3, 1), rows).view(b, h, w, 2, 2, cout).transpose(2, 3)
    out = torch.add(y, bias, out=y.new_empty(b, h, 2, w, 2, cout)).view(b, 2 * h, 2 * w, cout)
    return out.permute(0, 3, 1, 2)


@torch.library.custom_op("piip::upsample2x", mutates_args=())
def _upsample2x_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return _shuffled_gemm(x, weight, bias)


@_upsample2x_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, _, h, w = x.shape
    return x.new_empty(b, 2 * h, 2 * w, weight.shape[1]).permute(0, 3, 1, 2)


LEVEL_STRIDES = (4, 8, 16, 32)


class SimpleFeaturePyramid(nn.Module):
    """Maps at strides 4, 8, 16, 32 from maps at the strides the backbone outputs.

    Each level ``fpnK`` adapts its input map by the ratio of strides: x4 = 2 transposed convs
    (``norm`` + GELU between them), x2 = one, x1 = identity, /2 = max-pool. With one stride-16
    input for all levels this is the ViTDet simple feature pyramid; with the four merged maps of
    regular-FPN merging each level reads its own map (all identities for a CNN finest branch).
    ``norm`` is ``gn`` (GroupNorm(32), released PIIP code) or ``ln`` (channel LayerNorm, released
    ViTDet baselines). The maps come back in channels-last memory format (logically (B, C, H, W)).
    ``levels`` picks the maps returned (keys '0'..'3'); all four levels are built either way.
    """

    def __init__(self, dims: Union[int, Sequence[int]], norm: str = "gn",
                 in_strides: Sequence[int] = (16, 16, 16, 16), levels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        # levels: which maps forward returns (DINO reads strides 8/16/32 = levels 1, 2, 3; the
        # released code still holds fpn1, so its weights stay for strict loading)
        self.levels = sorted(set(levels)) if levels is not None else [0, 1, 2, 3]
        if not self.levels or any(lv not in (0, 1, 2, 3) for lv in self.levels):
            raise ValueError(f"pyramid_levels must be a non-empty subset of [0, 1, 2, 3], got {levels!r}")
        dims = [dims] * len(LEVEL_STRIDES) if isinstance(dims, int) else list(dims)
        if len(dims) != len(LEVEL_STRIDES) or len(in_strides) != len(LEVEL_STRIDES):
            raise ValueError(f"the pyramid needs one width and one input stride per level {LEVEL_STRIDES}, got "
                             f"widths {dims} and strides {list(in_strides)}")
        if norm not in ("gn", "ln"):
            raise ValueError(f"pyramid norm must be 'gn' or 'ln', got {norm!r}")
        for i, (dim, s_in, s_out) in enumerate(zip(dims, in_strides, LEVEL_STRIDES)):
            setattr(self, f"fpn{i + 1}", _level(dim, norm, s_in, s_out))

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> "OrderedDict[str, Tensor]":
        """``x``: one map for every level, or one map per level (all 4, indexed by level)."""
        xs = [x] * 4 if isinstance(x, Tensor) else list(x)
        fpns = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return OrderedDict((str(i), fpns[i](xs[i])) for i in self.levels)


def _level(dim: int, norm: str, s_in: int, s_out: int) -> nn.Module:
    if s_in == s_out:
        return nn.Identity()
    if s_in == 2 * s_out:
        return nn.Sequential(Upsample2x(dim, dim))
    if s_in == 4 * s_out:
        if norm == "gn" and dim % 32:
            raise ValueError(f"pyramid GroupNorm(32) needs a width divisible by 32, got {dim}")
        norm_layer = nn.GroupNorm(32, dim) if norm == "gn" else LayerNorm2d(dim, eps=1e-6)
        return nn.Sequential(Upsample2x(dim, dim), norm_layer, nn.GELU(), Upsample2x(dim, dim))
    if s_out == 2 * s_in:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"the pyramid cannot make a stride-{s_out} level from a stride-{s_in} map "
                     "(supported ratios: x4, x2, x1, /2)")
