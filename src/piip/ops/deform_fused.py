"""``fused`` deformable attention: one gather per sample, a hand-written backward.

The 4 bilinear corners of every sampling point are computed once (index + weight, with the
zero-padding mask and the attention weight folded into the corner weight), the values are
read with a single ``index_select`` and reduced with a batched dot product. The backward
re-gathers instead of keeping the (large) gathered tensor alive, scatters value gradients with
``index_add_`` and gives analytic gradients for the locations and attention weights.
Math matches ``grid_sample(align_corners=False, padding_mode='zeros')``; it runs in >= float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .ms_deform_attn import register_impl


class _Corners(NamedTuple):
    rows: Tensor   # (R, K) long: row of value.view(N*S*M, D) for each corner (0 where invalid)
    bw: Tensor     # (R, K) bilinear weight of each corner, zero where the corner is off the map
    fx: Tensor     # (R, L*P) fractional x
    fy: Tensor     # (R, L*P) fractional y
    valid: Tensor  # (R, K) bool


def _corners(loc: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> _Corners:
    """Corner rows and weights; R = N*Lq*M rows, K = L*P*4 corners (order 00, 10, 01, 11)."""
    n, lq, m, nl, p, _ = loc.shape
    dev = loc.device
    hw = spatial_shapes.to(device=dev, dtype=loc.dtype)
    h = hw[:, 0].view(1, 1, 1, nl, 1)
    w = hw[:, 1].view(1, 1, 1, nl, 1)
    x = loc[..., 0] * w - 0.5
    y = loc[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # (N, Lq, M, L, P, 4)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
    w4, h4 = w[..., None], h[..., None]
    valid = (xs >= 0) & (xs < w4) & (ys >= 0) & (ys < h4)
    gx, gy = 1 - fx, 1 - fy
    bw = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], -1) * valid
    start = level_start_index.to(dev).view(1, 1, 1, nl, 1, 1)
    pos = (start + ys.long() * w4.long() + xs.long()).clamp_(0, s - 1)
    nidx = torch.arange(n, device=dev).view(n, 1, 1, 1, 1, 1)
    midx = torch.arange(m, device=dev).view(1, 1, m, 1, 1, 1)
    rows = torch.where(valid, (nidx * s + pos) * m + midx, torch.zeros((), dtype=torch.long, device=dev))
    r = n * lq * m
    return _Corners(rows.view(r, -1), bw.view(r, -1), fx.view(r, -1), fy.view(r, -1), valid.view(r, -1))


def _gather(value: Tensor, rows: Tensor) -> Tensor:
    """(N*S*M, D) value rows at (R, K) indices -> (R, K, D)."""
    d = value.shape[-1]
    return value.reshape(-1, d).index_select(0, rows.reshape(-1)).view(*rows.shape, d)


class _FusedDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                loc: Tensor, attn: Tensor) -> Tensor:
        n, s, m, d = value.shape
        lq = loc.shape[1]
        c = _corners(loc, spatial_shapes, level_start_index, s)
        a = attn.reshape(c.bw.shape[0], -1)                    # (R, L*P)
        cw = (c.bw.view(a.shape[0], a.shape[1], 4) * a[..., None]).view_as(c.bw)  # (R, K)
        vals = _gather(value, c.rows)                           # (R, K, D)
        out = torch.bmm(cw.unsqueeze(1), vals).view(n, lq, m * d)
        ctx.save_for_backward(value, loc, attn, spatial_shapes, level_start_index)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, loc, attn, spatial_shapes, level_start_index = ctx.saved_tensors
        n, s, m, d = value.shape
        _, lq, _, nl, p, _ = loc.shape
        c = _corners(loc, spatial_shapes, level_start_index, s)
        r, lp = c.fx.shape
        g = grad_out.reshape(r, d, 1)
        a = attn.reshape(r, lp)
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            vals = _gather(value, c.rows)                            # (R, K, D)
            e = torch.bmm(vals, g).view(r, lp, 4) * c.valid.view(r, lp, 4)  # <grad, corner value>
            if ctx.needs_input_grad[4]:
                grad_attn = (e * c.bw.view(r, lp, 4)).sum(-1).view_as(attn)
            if ctx.needs_input_grad[3]:
                e00, e10, e01, e11 = e.unbind(-1)
                gx, gy = 1 - c.fx, 1 - c.fy
                dfx = a * (gy * (e10 - e00) + c.fy * (e11 - e01))
                dfy = a * (gx * (e01 - e00) + c.fx * (e11 - e10))
                hw = spatial_shapes.to(device=loc.device, dtype=loc.dtype)
                scale = torch.stack([hw[:, 1], hw[:, 0]], -1).view(1, nl, 1, 2)
                grad_loc = (torch.stack([dfx, dfy], -1).view(r, nl, p, 2) * scale).view_as(loc)
        if ctx.needs_input_grad[0]:
            cw = (c.bw.view(r, lp, 4) * a[..., None]).view(r, -1, 1)     # (R, K, 1)
            contrib = cw * grad_out.reshape(r, 1, d)                     # (R, K, D)
            grad_value = torch.zeros(n * s * m, d, dtype=value.dtype, device=value.device)
            grad_value.index_add_(0, c.rows.reshape(-1), contrib.view(-1, d))
            grad_value = grad_value.view(n, s, m, d)
        return grad_value, None, None, grad_loc, grad_attn


@register_impl("fused")
def ms_deform_attn_fused(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Gather-based bilinear sampling with an analytic backward; any device, >= float32 math."""
    dt = torch.promote_types(value.dtype, torch.float32)
    out = _FusedDeformAttn.apply(value.to(dt).contiguous(), spatial_shapes, level_start_index,
                                 sampling_locations.to(dt).contiguous(), attention_weights.to(dt).contiguous())
    return out.to(value.dtype)


ms_deform_attn_fused.supports = lambda value: True  # type: ignore[attr-defined]
