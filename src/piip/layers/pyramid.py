"""ViTDet simple feature pyramid: one stride-s map -> maps at strides s/4, s/2, s, 2s."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map, computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), self.normalized_shape, self.weight.float(),
                         self.bias.float(), self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


class SimpleFeaturePyramid(nn.Module):
    """fpn1: 2 transposed convs (x4), fpn2: one (x2), fpn3: identity, fpn4: max-pool (/2).

    ``norm`` is ``gn`` (GroupNorm(32), released PIIP code) or ``ln`` (channel LayerNorm,
    released ViTDet baselines) between the two transposed convs.
    """

    def __init__(self, dim: int, norm: str = "gn") -> None:
        super().__init__()
        if norm == "gn":
            if dim % 32:
                raise ValueError(f"pyramid GroupNorm(32) needs a width divisible by 32, got {dim}")
            norm_layer: nn.Module = nn.GroupNorm(32, dim)
        elif norm == "ln":
            norm_layer = LayerNorm2d(dim, eps=1e-6)
        else:
            raise ValueError(f"pyramid norm must be 'gn' or 'ln', got {norm!r}")
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), norm_layer, nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict((str(i), f(x).contiguous())
                           for i, f in enumerate((self.fpn1, self.fpn2, self.fpn3, self.fpn4)))
