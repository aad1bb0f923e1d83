"""The coarser branches' input views: the released ``F.interpolate(x, scale_factor=r)`` with the
output size computed in integers, identically in eager PyTorch and in exported graphs.

``interpolate(scale_factor=r)`` sizes its output ``floor(H * r)`` in floating point. Eager computes
that product in float64, an ONNX ``Resize`` in float32, so at sizes where ``H * r`` is (nearly) an
integer the two can disagree by a row, and an exported graph then reshapes the wrong number of tokens
at run time (issue 24: 0.18-0.26 relative error at 112x160 after a one-ulp change of ``r``). Here the
size is ``H * num // den`` for the exact ratio ``num / den`` of the registered resolutions, a
symbolic integer in a graph, and the sampling positions still use ``r`` as the released code does.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import opaque

MAX_DENOMINATOR = 1 << 16


def view_ratio(size: float, base: float) -> tuple[int, int]:
    """``size / base`` as the exact fraction of small integers it stands for: registered sizes are
    integers, and rescaling them all by one float factor moves the quotient by an ulp or so, far
    less than the gap between two fractions with denominators up to 2**16."""
    r = Fraction(size / base).limit_denominator(MAX_DENOMINATOR)
    return r.numerator, r.denominator


def view_size(h: int, w: int, num: int, den: int) -> tuple[int, int]:
    """``floor(side * num / den)`` for both sides, in integer arithmetic (SymInt-safe)."""
    return h * num // den, w * num // den


def resize_view(x: Tensor, num: int, den: int) -> Tensor:
    """Bilinear (half-pixel, no antialias) resize of ``x`` (B, C, H, W) by ``num / den`` < 1.

    Eager and torch.compile call the native kernel with the exact size and the released scale; an
    export (torch.export, ONNX) records the same arithmetic as plain index/lerp ops, since ONNX's
    ``Resize`` cannot take a size and a scale together.
    """
    scale = num / den
    size = view_size(x.shape[-2], x.shape[-1], num, den)
    if torch.compiler.is_exporting():
        return _bilinear_by_gather(x, size, scale)
    return bilinear(x, size, scale)


def bilinear(x: Tensor, size: tuple[int, int], scale: Optional[float] = None) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of a (B, C, H, W) map, with
    ``scale`` (both axes) for the sampling positions when given. A compiled CPU inference graph
    calls the eager kernel as one opaque op (``piip::bilinear``, :mod:`piip.ops.opaque`): for
    PIIP-TSB 1120's two input views Inductor's gather loops took 40 ms against 17.5 ms."""
    if opaque.wanted(x):
        return _bilinear_op(x, [size[0], size[1]], scale)
    if scale is None:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return torch._C._nn.upsample_bilinear2d(x, size, False, scale, scale)


@torch.library.custom_op("piip::bilinear", mutates_args=())
def _bilinear_op(x: Tensor, size: list[int], scale: Optional[float]) -> Tensor:
    out = torch._C._nn.upsample_bilinear2d(x, size, False, scale, scale)
    return out.contiguous(memory_format=_layout(x))    # the layout the fake promised


@_bilinear_op.register_fake
def _(x: Tensor, size: list[int], scale: Optional[float]) -> Tensor:
    return x.new_empty(*x.shape[:2], *size).contiguous(memory_format=_layout(x))


def _layout(x: Tensor) -> torch.memory_format:
    """The eager kernel's output layout: channels-last for a channels-last map, else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _axis_weights(n_in: int, n_out: int, scale: float, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Source rows (low, high) and the high row's weight for each output row, as the CPU kernel
    computes them: ``src = max((dst + 0.5) * float32(1 / scale) - 0.5, 0)``, one fused multiply-add
    rounded to float32 (exact in float64, then rounded: the kernel's values to within one ulp)."""
    step = float(torch.tensor(1.0 / scale, dtype=torch.float32))
    dst = torch.arange(n_out, device=like.device, dtype=torch.float64)
    src = ((dst + 0.5) * step - 0.5).to(torch.float32).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, (src - lo.to(torch.float32)).to(like.dtype)


def _bilinear_by_gather(x: Tensor, size: tuple[int, int], scale: float) -> Tensor:
    lo, hi, wy = _axis_weights(x.shape[-2], size[0], scale, x)
    x = torch.lerp(x.index_select(-2, lo), x.index_select(-2, hi), wy[:, None])
    lo, hi, wx = _axis_weights(x.shape[-1], size[1], scale, x)
    return torch.lerp(x.index_select(-1, lo), x.index_select(-1, hi), wx)
