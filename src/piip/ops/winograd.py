"""Wide 3x3 convolutions by Winograd's F(2x2, 3x3) (CPU inference).

The detection merge (``layers/merge.py``, the released code's ``conv`` merging) runs two 3x3
convolutions per branch at up to 768 channels on the finest grid: 68 of the 375 GMAC of an
as-built PIIP-TSB 1120 forward, against 2.4 GMAC of convolution in ViTDet-B. The segmentors'
UperNet head (``tasks/segmentation.py``) fuses 2048 channels into 512 with a 3x3 convolution on
the stride-4 map. Winograd's minimal filtering computes each 2x2 output tile from a 4x4 input tile
with 16 channel GEMMs instead of 36 multiply-adds per (input, output) channel pair: 2.25x fewer
multiply-adds, paid for with element-wise transforms of the input and output tiles. Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks" (CVPR 2016), with their F(2x2, 3x3) matrices:

    Y = A^T [ (G g G^T) . (B^T d B) ] A

where g is a 3x3 filter, d a 4x4 input tile, Y the 2x2 output tile. With every channel, the
product ``.`` becomes one (tiles x C_in) @ (C_in x C_out) GEMM per tile position (16 of them),
run on bands of tile rows whose transformed input stays under ``CHUNK_BYTES``.

The transforms are additions only (B, A) or halvings (G), so it is accurate: against a float64
convolution the error was 2-4x smaller than oneDNN's direct float32 convolution's. They cost memory
passes, which is why it is taken only for wide channels. On one core of this project's Xeon VM the
merge's and the head's convolutions ran 1.3-2.0x faster, narrower ones between 0.57x and 1.27x
from run to run (``benchmarks/micro_ops.py --rows winograd``, docs/performance.md). :func:`applies`
takes it at both widths >= 384.

The filter transform ``G g G^T`` (16 x C_in x C_out, 16/9 of the weight's memory) is computed once
per weight state and kept (``piip.ops.derived``); weights that cannot be tracked (made under
``inference_mode``) keep the direct convolution. Compiled CPU inference calls it as the opaque op
``piip::winograd_conv3x3`` (``piip.ops.opaque``). ``PIIP_WINOGRAD=0`` or :func:`set_enabled` turns it
off.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import derived
from .linear import unobserved
from .pad import zero_padded
from .switch import Switch
from .symbolic import pair

_SWITCH = Switch("PIIP_WINOGRAD")
set_enabled, enabled = _SWITCH.set, _SWITCH.get
MIN_CHANNELS = 384   # both widths at least this (narrower convolutions gain little or lose)

# F(2x2, 3x3): filter transform G (4 x 3); B^T and A^T are applied as explicit sums below
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def suitable(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> bool:
    """A float32 3x3, stride-1, padding-1 convolution of two wide channel counts, the path on."""
    return (_SWITCH.on and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and groups == 1 and tuple(weight.shape[2:]) == (3, 3) and pair(stride) == (1, 1)
            and pair(padding) == (1, 1) and pair(dilation) == (1, 1)
            and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
            and (bias is None or bias.dtype == torch.float32))


def applies(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> bool:
    """:func:`suitable` for an eager call nothing can tell apart (no gradient, autocast, dispatch
    mode such as FLOP counting, or tracing: ``piip.ops.linear.unobserved``), whose filter transform
    can be kept."""
    return (suitable(x, weight, bias, stride, padding, dilation, groups) and unobserved(x, weight, bias)
            and derived.trackable((weight, bias)))


def filter_transform(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (16, C_in, C_out): ``G g G^T`` per channel pair, tile positions
    (u, v) row-major. Computed in float64 (the entries of G are exact in binary, so each entry is
    rounded once) as two GEMMs over all channel pairs at once (an einsum of the same took ~10x longer)."""
    co, c = weight.shape[:2]
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    w = weight.detach().double().permute(2, 1, 0, 3).reshape(3, c * co * 3)      # (i, (c, o, j))
    a = (g @ w).view(4 * c * co, 3)                                                 # (u, c, o) x j
    return (a @ g.T).view(4, c, co, 4).permute(0, 3, 1, 2).reshape(16, c, co).to(weight.dtype)


def conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor], transformed: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (B, C_in, H, W) map (any memory format; a
    channels-last one is read without a transposing copy), returned channels-last (B, C_out, H, W).
    No gradient. ``transformed``: :func:`filter_transform` of ``weight`` made by the caller (else
    kept in ``piip.ops.derived``). Tile rows are processed in chunks whose transformed input stays
    under ``CHUNK_BYTES``, so the working set is bounded whatever the map size."""
    u = transformed if transformed is not None else derived.cached("winograd", (weight,),
                                                                  lambda: filter_transform(weight))
    b, c, h, w = x.shape
    co = u.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2          # 2x2 output tiles; odd sizes get a cropped last tile
    hp, wp = 2 * th + 2, 2 * tw + 2
    # the zero-padded map (B, hp, wp, C): one pixel on top / left, one or two on the bottom / right
    xp = zero_padded(x.permute(0, 2, 3, 1), 1, hp - h - 1, 1, wp - w - 1)
    out = x.new_empty(b, th, 2, tw, 2, co)
    step = max(1, CHUNK_BYTES // (16 * b * tw * max(c, co) * x.element_size()))
    for i in range(0, th, step):
        n = min(step, th - i)
        _tile_rows(xp[:, 2 * i:2 * (i + n) + 2], u, out[:, i:i + n])
    if bias is not None:
        out += bias
    out = out.view(b, 2 * th, 2 * tw, co)
    if (2 * th, 2 * tw) != (h, w):
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


CHUNK_BYTES = 16 << 20


def _tile_rows(xp: Tensor, u: Tensor, out: Tensor) -> None:
    """One band of tile rows: ``xp`` (B, 2n + 2, wp, C) padded input rows -> ``out`` (B, n, 2, tw, 2,
    C_out) output tiles."""
    b, hp, wp, c = xp.shape
    n, tw, co = (hp - 2) // 2, (wp - 2) // 2, u.shape[-1]
    sb, sh, sw, sc = xp.stride()
    # B^T along the rows: tile row i reads padded rows 2i..2i+3 (r0..r3), without cutting columns yet
    r = xp.as_strided((4, b, n, wp, c), (sh, sb, 2 * sh, sw, sc))
    rows = xp.new_empty(4, b, n, wp, c)
    _bt(r[0], r[1], r[2], r[3], rows)
    # B^T along the columns: tile column j reads columns 2j..2j+3 -> V (4, 4, B*n*tw, C)
    sk, sb, st, sw, sc = rows.stride()
    cols = rows.as_strided((4, 4, b, n, tw, c), (sw, sk, sb, st, 2 * sw, sc))   # (column v, row u, ...)
    v = xp.new_empty(4, 4, b, n, tw, c)
    _bt(cols[0], cols[1], cols[2], cols[3], v.transpose(0, 1))
    # the 16 channel GEMMs
    m = torch.bmm(v.view(16, b * n * tw, c), u).view(4, 4, b, n, tw, co)
    # A^T along u (rows) then v (columns), written into the output tiles
    s = xp.new_empty(2, 4, b, n, tw, co)
    _at(m[0], m[1], m[2], m[3], s)
    _at(s[:, 0], s[:, 1], s[:, 2], s[:, 3], out.permute(4, 2, 0, 1, 3, 5))


def _bt(d0: Tensor, d1: Tensor, d2: Tensor, d3: Tensor, out: Tensor) -> None:
    """out[k] = (B^T d)[k] for B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _at(m0: Tensor, m1: Tensor, m2: Tensor, m3: Tensor, out: Tensor) -> None:
    """out[k] = (A^T m)[k] for A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    torch.add(m0, m1, out=out[0]).add_(m2)
    torch.sub(m1, m2, out=out[1]).sub_(m3)


@torch.library.custom_op("piip::winograd_conv3x3", mutates_args=())
def conv3x3_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """:func:`conv3x3` as one opaque op of a compiled CPU inference graph (its weights are graph
    inputs; the kept filter transform is looked up when the graph runs). Weights it cannot keep a
    transform of take the direct convolution. Returns a channels-last map either way."""
    if derived.trackable((weight, bias)):
        return conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, 1, 1).contiguous(memory_format=torch.channels_last)


@conv3x3_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    b, _, h, w = x.shape
    return x.new_empty((b, weight.shape[0], h, w)).contiguous(memory_format=torch.channels_last)
