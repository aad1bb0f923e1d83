"""ViTDet simple feature pyramid: one stride-s map -> maps at strides s/4, s/2, s, 2s."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        b, c, h, w = x.shape
        cout = self.out_channels
        weight = self.weight.permute(2, 3, 1, 0).reshape(4 * cout, c)       # rows (i, j, c_out)
        y = F.linear(x.permute(0, 2, 3, 1), weight)                           # (B, H, W, 4*C_out)
        y = y.view(b, h, w, 2, 2, cout).transpose(2, 3)                       # (B, H, i, W, j, C_out)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (y.requires_grad or self.bias.requires_grad)):
            # autograd needs the plain expression; Inductor fuses the add into the reshape copy
            # itself and mishandles the out= strides below
            out = (y + self.bias).reshape(b, 2 * h, 2 * w, cout)
        else:  # eager inference, one pass: the bias add writes the shuffled layout directly
            out = torch.add(y, self.bias, out=y.new_empty(b, h, 2, w, 2, cout)).view(b, 2 * h, 2 * w, cout)
        return out.permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """fpn1: 2 transposed convs (x4), fpn2: one (x2), fpn3: identity, fpn4: max-pool (/2).

    ``norm`` is ``gn`` (GroupNorm(32), released PIIP code) or ``ln`` (channel LayerNorm,
    released ViTDet baselines) between the two transposed convs. The maps come back in
    channels-last memory format (logically (B, C, H, W)); convolutions downstream accept it.
    """

    def __init__(self, dim: int, norm: str = "gn", levels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        # levels: which maps forward returns (DINO reads strides 8/16/32 = levels 1, 2, 3; the
        # released code still holds fpn1, so its weights stay for strict loading)
        self.levels = sorted(set(levels)) if levels is not None else [0, 1, 2, 3]
        if not self.levels or any(lv not in (0, 1, 2, 3) for lv in self.levels):
            raise ValueError(f"pyramid_levels must be a non-empty subset of [0, 1, 2, 3], got {levels!r}")
        if norm == "gn":
            if dim % 32:
                raise ValueError(f"pyramid GroupNorm(32) needs a width divisible by 32, got {dim}")
            norm_layer: nn.Module = nn.GroupNorm(32, dim)
        elif norm == "ln":
            norm_layer = LayerNorm2d(dim, eps=1e-6)
        else:
            raise ValueError(f"pyramid norm must be 'gn' or 'ln', got {norm!r}")
        self.fpn1 = nn.Sequential(Upsample2x(dim, dim), norm_layer, nn.GELU(), Upsample2x(dim, dim))
        self.fpn2 = nn.Sequential(Upsample2x(dim, dim))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        fpns = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return OrderedDict((str(i), fpns[i](x)) for i in self.levels)
