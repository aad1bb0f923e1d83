"""``fused`` deformable attention: one gather-reduce per sample, a hand-written backward.

The 4 bilinear corners of every sampling point are computed once (row index + weight, with
the zero-padding mask and the attention weight folded into the corner weight); the forward is
one ``embedding_bag`` (a fused gather + weighted sum; each (batch, query, head) is one bag of
L*P*4 value rows). The backward reuses the saved corners, scatters value gradients with
``scatter_add_`` and gives analytic gradients for the locations and attention weights.
Math matches ``grid_sample(align_corners=False, padding_mode='zeros')``; it runs in >= float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ms_deform_attn import register_impl


class _Corners(NamedTuple):
    rows: Tensor   # (R, LP, 4) long: row of value.view(N*S*M, D) per corner (00, 10, 01, 11)
    wx: Tensor     # (R, LP, 2) x weights (1-fx, fx), zero where that column is off the map
    wy: Tensor     # (R, LP, 2) y weights (1-fy, fy), zero where that row is off the map
    vx: Tensor     # (R, LP, 2) float column validity (d wx / d fx = vx * (-1, +1))
    vy: Tensor     # (R, LP, 2) float row validity


def _corners(loc: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> _Corners:
    """Corner rows and separable bilinear weights; R = N*Lq*M, LP = L*P."""
    n, lq, m, nl, p, _ = loc.shape
    dev = loc.device
    hw = spatial_shapes.to(device=dev)
    size = torch.stack([hw[:, 1], hw[:, 0]], -1).view(1, 1, 1, nl, 1, 2)   # (W, H)
    xy = loc * size.to(loc.dtype) - 0.5
    xy0 = xy.floor()
    frac = xy - xy0
    i0 = xy0.long()
    v0 = ((i0 >= 0) & (i0 < size)).to(loc.dtype)            # corner 0 in range, per axis
    v1 = ((i0 >= -1) & (i0 < size - 1)).to(loc.dtype)        # corner 1 in range
    w0, w1 = (1 - frac) * v0, frac * v1
    r, lp = n * lq * m, nl * p
    wx = torch.stack([w0[..., 0], w1[..., 0]], -1).view(r, lp, 2)
    wy = torch.stack([w0[..., 1], w1[..., 1]], -1).view(r, lp, 2)
    vx = torch.stack([v0[..., 0], v1[..., 0]], -1).view(r, lp, 2)
    vy = torch.stack([v0[..., 1], v1[..., 1]], -1).view(r, lp, 2)
    width = size[..., 0]                                      # (1, 1, 1, L, 1)
    start = level_start_index.to(dev).view(1, 1, 1, nl, 1)
    nidx = torch.arange(n, device=dev).view(n, 1, 1, 1, 1) * s
    midx = torch.arange(m, device=dev).view(1, 1, m, 1, 1)
    base = (nidx + start + i0[..., 1] * width + i0[..., 0]) * m + midx     # row of corner 00
    step = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1], -1) * m
    rows = (base[..., None] + step).clamp_(0, n * s * m - 1)   # off-map corners carry weight 0
    return _Corners(rows.view(r, lp, 4), wx, wy, vx, vy)


def _corner_weights(c: _Corners) -> Tensor:
    """(R, LP, 4) bilinear weight of each corner, order 00, 10, 01, 11."""
    return (c.wy[..., :, None] * c.wx[..., None, :]).flatten(-2)


class _FusedDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                loc: Tensor, attn: Tensor) -> Tensor:
        n, s, m, d = value.shape
        lq = loc.shape[1]
        c = _corners(loc, spatial_shapes, level_start_index, s)
        r, lp = c.wx.shape[:2]
        a = attn.reshape(r, lp, 1)
        cw = (_corner_weights(c) * a).view(r, -1)
        out = F.embedding_bag(c.rows.view(r, -1), value.view(-1, d), mode="sum", per_sample_weights=cw)
        ctx.save_for_backward(value, attn, *c)
        ctx.loc_shape, ctx.shapes = loc.shape, spatial_shapes
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, attn, *saved = ctx.saved_tensors
        c = _Corners(*saved)
        n, s, m, d = value.shape
        r, lp = c.wx.shape[:2]
        a = attn.reshape(r, lp)
        g = grad_out.reshape(r, d)
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            vals = value.view(-1, d).index_select(0, c.rows.view(-1)).view(r, -1, d)
            e = torch.bmm(vals, g[:, :, None]).view(r, lp, 2, 2)   # <grad, corner value>, [y][x]
            if ctx.needs_input_grad[4]:
                grad_attn = (_corner_weights(c).view(r, lp, 2, 2) * e).sum((-1, -2)).view_as(attn)
            if ctx.needs_input_grad[3]:
                sign = torch.tensor([-1.0, 1.0], dtype=value.dtype, device=value.device)
                ex = (e * (c.vx * sign)[:, :, None, :]).sum(-1)         # d/dfx per y corner row
                ey = (e * (c.vy * sign)[:, :, :, None]).sum(-2)         # d/dfy per x corner column
                dfx = (ex * c.wy).sum(-1) * a
                dfy = (ey * c.wx).sum(-1) * a
                nl = ctx.shapes.shape[0]
                hw = ctx.shapes.to(device=value.device, dtype=value.dtype)
                scale = torch.stack([hw[:, 1], hw[:, 0]], -1).view(1, nl, 1, 2)
                grad_loc = (torch.stack([dfx, dfy], -1).view(r, nl, -1, 2) * scale).view(ctx.loc_shape)
        if ctx.needs_input_grad[0]:
            cw = (_corner_weights(c) * a[..., None]).view(1, r, -1)      # (1, R, K)
            # scatter in a channel-major layout: long contiguous index runs, cheapest on CPU
            contrib = (g.t().contiguous()[:, :, None] * cw).view(d, -1)  # (D, R*K)
            grad_t = torch.zeros(d, n * s * m, dtype=value.dtype, device=value.device)
            grad_t.scatter_add_(1, c.rows.view(1, -1).expand(d, -1), contrib)
            grad_value = grad_t.t().reshape(n, s, m, d)
        return grad_value, None, None, grad_loc, grad_attn


@register_impl("fused")
def ms_deform_attn_fused(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Gather-based bilinear sampling with an analytic backward; any device, >= float32 math."""
    dt = torch.promote_types(value.dtype, torch.float32)
    out = _FusedDeformAttn.apply(value.to(dt).contiguous(), spatial_shapes, level_start_index,
                                 sampling_locations.to(dt).contiguous(), attention_weights.to(dt).contiguous())
    return out.to(value.dtype)


def _supports(value: Tensor) -> bool:
    """Auto-selection: inference on CPU (measured faster than grid_sample there; its backward is
    not yet faster than grid_sample's on CPU, see docs/performance.md), never on CUDA (triton)."""
    return not value.is_cuda and not (torch.is_grad_enabled() and value.requires_grad)


ms_deform_attn_fused.supports = _supports  # type: ignore[attr-defined]
