"""A ``Conv2d`` that keeps channels-last maps channels-last on CPU."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import derived, opaque, winograd
from ..ops.symbolic import grad_wanted, tracing


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, keys and results to float rounding) for maps that are
    channels-last in memory, as token grids viewed as (B, C, H, W) are.

    PyTorch's CPU convolution runs channels-last only when its weight is channels-last too; with a
    default-strided weight it copies such a map to NCHW, runs there and returns NCHW, which the next
    layer copies back. Given a channels-last map and no gradient wanted, this passes a channels-last
    weight instead, kept between calls (``piip.ops.derived``). Training keeps the stock call: its
    speed with channels-last weights was not measured apart from noise (a classifier train step
    0.99-1.00x).
    At PIIP-TSB 1120's shapes on one core (``benchmarks/micro_ops.py --rows dwconv conv3x3``): the
    ConvFFN's depthwise convs, back to tokens, in 0.25-0.37 of the time (no copy either way); the
    detection merge's 3x3 convs in 0.90-0.96. Wide 3x3 convolutions (both widths >= 384, float32:
    the detection merge's and the UperNet head's), channels-last or not, go through Winograd's
    F(2x2, 3x3) instead (``piip.ops.winograd``). Traced graphs and other inputs take the stock call.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if (self.padding_mode == "zeros" and opaque.wanted(x, self.weight, self.bias)
                and winograd.suitable(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)):
            return winograd.conv3x3_op(x, self.weight, self.bias)    # compiled inference: as one opaque op
        if not (x.dim() == 4 and x.device.type == "cpu" and self.padding_mode == "zeros" and not tracing()
                and not grad_wanted(x, self.weight)):
            return super().forward(x)
        if winograd.applies(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups):
            return winograd.conv3x3(x, self.weight, self.bias)      # any memory format in, channels-last out
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return channels_last_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                      self.groups)
        return super().forward(x)


def channels_last_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                       groups: int) -> Tensor:
    """``F.conv2d`` of a channels-last map with a channels-last copy of ``weight`` kept between
    calls (``piip.ops.derived``), so the map stays channels-last. No gradient."""
    # .to(): contiguous(memory_format=...) keeps a (C, 1, k, k) weight's default strides
    kept = derived.cached("channels_last", (weight,), lambda: weight.to(memory_format=torch.channels_last))
    return F.conv2d(x, kept, bias, stride, padding, dilation, groups)
