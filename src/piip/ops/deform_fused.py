"""``fused`` deformable attention: gather-reduce kernels of PyTorch itself, no grid_sample.

Levels are handled one at a time (PIIP attends to exactly one). Each level's value map is
zero-padded by one pixel, so a sample's 2x2 bilinear patch is addressed by one *patch row*
(its top-left corner in the padded grid) and corners that fall off the map read zeros; only
samples whose whole patch misses the padded grid are masked.

* forward: one ``embedding_bag`` per level (a fused gather + weighted sum; each (batch, query,
  head) is one bag of P*4 rows whose weights are attention x bilinear weight). Eager float32
  inference builds its rows and weights in fewer passes, with the same result bit for bit
  (:func:`_sample_no_grad`: a two-pixel border and clamped cells instead of the mask);
* value gradient: the samples are sorted once by patch row; each of the 4 corners is then an
  ``embedding_bag`` over the output gradients with per-row offsets (a sorted gather-reduce),
  and the 4 results are added with a shift in the flat padded grid. No scatter, no atomics;
* location / attention gradients: a "patch table" holds each position's 4 corner vectors side
  by side, so one row gather + one batched matmul gives <grad, corner value> for all corners.

Under torch.compile the backward is written for the compiler instead: the corner dot products
as one gather-multiply-reduce and the value gradient as one ``index_add_`` (a scatter), each of
which Inductor generates as a single loop with nothing materialised; no sort, no chunk loop over
a (possibly symbolic) row count, so the whole op stays in one graph with a dynamic batch.
Compiled, the op alone runs forward + backward 2.6-3x faster than the eager one above at PIIP-TSB's
detection shapes (``benchmarks/deform_attn.py --compile``). Eagerly the same two expressions
materialise every gathered corner and weighted gradient row: run eagerly at those shapes they made
the op's forward + backward 4x slower than the sorted gather-reduce (0.46x against 1.84x of
``reference``'s speed), hence the two strategies.

Math matches ``grid_sample(align_corners=False, padding_mode='zeros')`` and runs in >= float32;
the bilinear cell is picked as Deformable-DETR's CUDA op picks it (:func:`pixel_coords`), which at
exact pixel centres can differ from grid_sample's choice (see ``ms_deform_attn_reference``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import opaque
from .ms_deform_attn import (LevelShapes, ShapesArg, StartsArg, level_layout, ms_deform_attn_points,
                             register_impl)
from .pad import zero_padded
from .symbolic import grad_wanted


class _Geometry(NamedTuple):
    rows: Tensor    # (R, P) int32 (int64 for huge maps): patch row in the padded (N, H+2, W+2, M) grid; R = N*Lq*M
    fx: Tensor      # (R, P) fractional x inside the patch
    fy: Tensor      # (R, P) fractional y inside the patch
    inside: Tensor  # (R, P) 1.0 where the patch touches the padded grid, else 0.0


def _geometry(loc: Tensor, h: int, w: int) -> _Geometry:
    """loc (N, Lq, M, P, 2) in [0, 1] (x, y) -> patch rows, fractions and the in-grid mask."""
    n, lq, m, p, _ = loc.shape
    x32, y32 = pixel_coords(loc, h, w)
    x0, y0 = x32.floor().to(loc.dtype), y32.floor().to(loc.dtype)
    inside = (x32 > -1) & (x32 < w) & (y32 > -1) & (y32 < h)          # the CUDA op's test; NaN -> False
    # fractions in the op's dtype, relative to the cell the float32 coordinate picked
    x, y = (x32, y32) if loc.dtype == torch.float32 else (loc[..., 0] * w - 0.5, loc[..., 1] * h - 0.5)
    # padded coordinates of the top-left corner; masked samples point at row 0 (weight 0)
    # int32 rows when they fit: half the index traffic (embedding_bag / index_select accept them);
    # symbolic sizes (export / compile) take int64 rather than guard on the size
    total = n * (h + 2) * (w + 2) * m
    itype = torch.int32 if isinstance(total, int) and total < 2 ** 31 else torch.int64
    base = torch.arange(n, device=loc.device, dtype=itype).view(n, 1, 1, 1) * ((h + 2) * (w + 2))
    heads = torch.arange(m, device=loc.device, dtype=itype).view(1, 1, m, 1)
    if isinstance(total, int) and (h + 2) * (w + 2) < 2 ** 24:
        # concrete sizes, each padded map's positions exact in float32: the in-map row
        # x0 + (w+2) y0 in one op (masked: -(w+3), which the shift below makes the padded corner
        # (0, 0) of the sample's image and head, as the general form does), then the
        # image, head and padding offsets in one integer op (4 passes where the general form takes 11)
        cell = torch.where(inside, torch.add(x0, y0, alpha=w + 2), -(w + 3)).to(itype)
        rows = torch.add(base * m + heads + (w + 3) * m, cell, alpha=m)
    else:
        xp = torch.where(inside, x0 + 1, 0).to(itype)
        yp = torch.where(inside, y0 + 1, 0).to(itype)
        rows = (base + yp * (w + 2) + xp) * m + heads
    r = n * lq * m
    return _Geometry(rows.view(r, p), (x - x0).view(r, p), (y - y0).view(r, p),
                     inside.to(loc.dtype).view(r, p))


def pixel_coords(loc: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``loc * size - 0.5`` in float32, as Deformable-DETR's CUDA op computes them.

    Their ``floor`` picks the bilinear cell. Points placed on pixel centres (the encoder's reference
    points plus the integer offsets of the sampling-offset initialisation) sit on a cell border
    where the location gradient has a kink; rounding in float32 like the CUDA op picks the same
    cell, hence the same one-sided gradient, whatever the input dtype."""
    loc32 = loc.float()
    return loc32[..., 0] * w - 0.5, loc32[..., 1] * h - 0.5


def _corner_weights(fx: Tensor, fy: Tensor, a: Tensor) -> Tensor:
    """(..., 4) weights a * bilinear of the corners 00, 01, 10, 11 ([y][x]) from (...) tensors.

    Built from whole-tensor products (no size-2 broadcast dims, which are slow on CPU). Eagerly
    without autograd the products are written straight into the (..., 4) result: a stack along the
    last dim copies element by element, and took half the time of building the weights."""
    ax1 = a * fx
    ax0 = a - ax1
    if torch.compiler.is_compiling() or grad_wanted(fx, fy, a):
        return torch.stack([ax0 - ax0 * fy, ax1 - ax1 * fy, ax0 * fy, ax1 * fy], -1)
    out = a.new_empty(*a.shape, 4)
    torch.mul(ax0, fy, out=out[..., 2])
    torch.sub(ax0, out[..., 2], out=out[..., 0])
    torch.mul(ax1, fy, out=out[..., 3])
    torch.sub(ax1, out[..., 3], out=out[..., 1])
    return out


def _corner_offsets(w: int, m: int) -> list[int]:
    """Row offsets of the corners (00, 01, 10, 11) = (top-left, top-right, ...) from the patch row."""
    return [0, m, (w + 2) * m, (w + 3) * m]


def _corner_rows(rows: Tensor, w: int, m: int) -> Tensor:
    """(R, P*4) padded-grid rows of every sample's 4 corners, from its (R, P) patch rows."""
    r, p = rows.shape
    if torch.compiler.is_compiling():   # (the sizes may be symbolic: no tensor of them)
        return torch.stack([rows + off for off in _corner_offsets(w, m)], -1).view(r, p * 4)
    return (rows[..., None] + torch.tensor(_corner_offsets(w, m), dtype=rows.dtype, device=rows.device)).view(r, p * 4)


class _FusedLevel(torch.autograd.Function):
    """One level: value (N, H, W, M, D), loc (N, Lq, M, P, 2), attn (N, Lq, M, P) -> (N*Lq*M, D)."""

    @staticmethod
    def forward(ctx, value: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        n, h, w, m, d = value.shape
        geo = _geometry(loc, h, w)
        r, p = geo.rows.shape
        vpad = F.pad(value, (0, 0, 0, 0, 1, 1, 1, 1))                 # (N, H+2, W+2, M, D)
        a = attn.reshape(r, p) * geo.inside
        cw = _corner_weights(geo.fx, geo.fy, a).view(r, p * 4)
        idx = _corner_rows(geo.rows, w, m)
        out = F.embedding_bag(idx, vpad.view(-1, d), mode="sum", per_sample_weights=cw)
        ctx.save_for_backward(vpad, a, *geo)
        ctx.hw = (h, w)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        vpad, a, *saved = ctx.saved_tensors
        geo = _Geometry(*saved)
        h, w = ctx.hw
        n, _, _, m, d = vpad.shape
        r, p = geo.rows.shape
        g = grad_out.contiguous()
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            e = _corner_dots(vpad, geo.rows, g).view(r, p, 4)       # <grad, corner value>
            e00, e01, e10, e11 = e.unbind(-1)
            fx, fy = geo.fx, geo.fy
            if ctx.needs_input_grad[2]:
                top = e00 + fx * (e01 - e00)
                grad_attn = (top + fy * (e10 + fx * (e11 - e10) - top)) * geo.inside
            if ctx.needs_input_grad[1]:
                dx0, dx1 = e01 - e00, e11 - e10                       # d/dfx on the top / bottom row
                dy0, dy1 = e10 - e00, e11 - e01                       # d/dfy on the left / right column
                gx = (dx0 + fy * (dx1 - dx0)) * a * w
                gy = (dy0 + fx * (dy1 - dy0)) * a * h
                grad_loc = torch.stack([gx, gy], -1)
        if ctx.needs_input_grad[0]:
            grad_value = _value_grad(g, geo, a, vpad.shape).view(n, h + 2, w + 2, m, d)
            grad_value = grad_value[:, 1:h + 1, 1:w + 1]
        shape = (n, -1, m, p)
        return (grad_value,
                None if grad_loc is None else grad_loc.view(*shape, 2),
                None if grad_attn is None else grad_attn.view(shape))


def _corner_dots(vpad: Tensor, rows: Tensor, g: Tensor, chunk_bytes: int = 1 << 22) -> Tensor:
    """(R, P*4) dot products of each row's output gradient with its samples' 4 corner values.

    A patch table (padded row t holds the values of rows t + offset_c, the same corner offsets
    as the forward) makes each sample's corners one row; rows a patch row never takes (last
    column / row of the padded grid) keep whatever the shift gives. Gather + batched matmul run
    in chunks of a few MB so the gathered corners stay small (large temporaries cost page
    faults on every call).
    """
    n, hp, wp, m, d = vpad.shape
    total = n * hp * wp * m
    flat = vpad.view(total, d)
    r, p = rows.shape
    if torch.compiler.is_compiling():
        # traced: one gather-multiply-reduce that Inductor runs as a single loop, no table, no
        # chunks (a Python loop over a symbolic row count would specialise the graph on it)
        return (flat[_corner_rows(rows, wp - 2, m)] * g[:, None, :]).sum(-1)
    table = vpad.new_zeros(total, 4, d)
    for c, off in enumerate(_corner_offsets(wp - 2, m)):
        table[:total - off, c] = flat[off:]
    table = table.view(total, 4 * d)
    e = g.new_empty(r, p * 4, 1)
    step = max(1, chunk_bytes // (p * 4 * d * g.element_size()))
    for i in range(0, r, step):
        j = min(r, i + step)
        corners = table.index_select(0, rows[i:j].reshape(-1)).view(j - i, p * 4, d)
        torch.bmm(corners, g[i:j, :, None], out=e[i:j])
    return e.view(r, p * 4)


def _value_grad(g: Tensor, geo: _Geometry, a: Tensor, pad_shape: torch.Size) -> Tensor:
    """Transpose of the forward gather: (R, D) output grads -> (N*(H+2)*(W+2)*M, D) padded rows.

    Sorting the samples by patch row turns the scatter into gather-reduces: for corner c, the
    bag of padded row ``t`` is the samples whose patch row is ``t - offset_c``.
    """
    n, hp, wp, m, d = pad_shape
    total = n * hp * wp * m
    r, p = geo.rows.shape
    if torch.compiler.is_compiling():
        # traced: a scatter-add of the weighted gradients that Inductor runs as one loop (no sort)
        cw = _corner_weights(geo.fx, geo.fy, a).view(r, p * 4, 1)
        idx = _corner_rows(geo.rows, wp - 2, m).view(-1)
        return g.new_zeros(total, d).index_add_(0, idx, (cw * g[:, None, :]).view(-1, d))
    flat = geo.rows.view(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=total)
    starts = (counts.cumsum(0) - counts).to(flat.dtype)
    src = torch.div(order, p, rounding_mode="floor").to(flat.dtype)  # which grad row
    fx, fy, aa = (t.reshape(-1).index_select(0, order) for t in (geo.fx, geo.fy, a))
    weights = _corner_weights(fx, fy, aa).t()                           # (4, R*P), sorted
    out = g.new_zeros(total, d)
    for c, off in enumerate(_corner_offsets(wp - 2, m)):
        part = F.embedding_bag(src, g, starts, mode="sum", per_sample_weights=weights[c].contiguous())
        out[off:] += part[:total - off]
    return out


@register_impl("fused")
def ms_deform_attn_fused(value: Tensor, spatial_shapes: ShapesArg, level_start_index: StartsArg,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Patch-row gather-reduce sampling with an analytic backward; any device, >= float32 math."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    out = None
    shapes, starts = level_layout(spatial_shapes, level_start_index)
    for lvl, ((h, w), v) in enumerate(zip(shapes, _level_maps(value, shapes, starts))):
        loc, attn = sampling_locations[:, :, :, lvl].to(v.dtype), attention_weights[:, :, :, lvl].to(v.dtype)
        part = (_sample_no_grad(v, *pixel_coords(loc, h, w), attn) if _fast_path(v, loc, attn)
                else _FusedLevel.apply(v, loc, attn))
        out = part if out is None else out + part
    return out.view(n, lq, m * d).to(value.dtype)


def _level_maps(value: Tensor, shapes: LevelShapes, starts: tuple[int, ...]) -> list[Tensor]:
    """Each level's (N, H, W, M, D) map of the (N, S, M, D) values, in at least float32."""
    n, _, m, d = value.shape
    v = value.to(torch.promote_types(value.dtype, torch.float32))
    return [v[:, start:start + h * w].reshape(n, h, w, m, d) for (h, w), start in zip(shapes, starts)]


def _from_offsets(value: Tensor, shapes: ShapesArg, starts: StartsArg, reference_points: Tensor,
                  sampling_offsets: Tensor, attention_weights: Tensor) -> Optional[Tensor]:
    """:func:`ms_deform_attn_fused` at ``reference_points + sampling_offsets / (W, H)``, where
    :func:`_sample_no_grad` applies (else None): the pixel coordinates are ``ref * size - 0.5``, one
    small (N or 1, Lq) plane per level, plus the offsets, one pass a coordinate. Through the
    locations they took three (the locations, then ``loc * size - 0.5``'s product and sum); the
    points are the same to float rounding (a float32 ulp of the coordinate)."""
    n, _, m, d = value.shape
    lq = sampling_offsets.shape[1]
    shapes, starts = level_layout(shapes, starts)
    if opaque.wanted(value, reference_points, sampling_offsets, attention_weights):
        # compiled inference: this eager path as one opaque op (Inductor's loops for the geometry
        # took longer than the eager passes)
        return _points_op(value, [s for hw in shapes for s in hw], list(starts), reference_points,
                          sampling_offsets, attention_weights)
    levels = _level_maps(value, shapes, starts)
    if grad_wanted(reference_points) or not all(_fast_path(vl, sampling_offsets, attention_weights)
                                                for vl in levels):
        return None
    out = None
    for lvl, ((h, w), vl) in enumerate(zip(shapes, levels)):
        centre = reference_points[:, :, lvl].float() * reference_points.new_tensor([w, h], dtype=torch.float32) - 0.5
        off = sampling_offsets[:, :, :, lvl]
        x = torch.add(off[..., 0], centre[:, :, None, None, 0])
        y = torch.add(off[..., 1], centre[:, :, None, None, 1])
        part = _sample_no_grad(vl, x, y, attention_weights[:, :, :, lvl].float())
        out = part if out is None else out + part
    return out.view(n, lq, m * d).to(value.dtype)


@torch.library.custom_op("piip::deform_points", mutates_args=())
def _points_op(value: Tensor, shapes: list[int], starts: list[int], reference_points: Tensor,
               sampling_offsets: Tensor, attention_weights: Tensor) -> Tensor:
    """``ms_deform_attn_points(..., impl="fused")`` on concrete tensors (``shapes`` flat: h0, w0, h1, ...):
    :func:`_from_offsets` where it applies, else through the locations."""
    levels = [(shapes[i], shapes[i + 1]) for i in range(0, len(shapes), 2)]
    return ms_deform_attn_points(value, levels, starts, reference_points, sampling_offsets, attention_weights,
                                 impl="fused")


@_points_op.register_fake
def _(value: Tensor, shapes: list[int], starts: list[int], reference_points: Tensor, sampling_offsets: Tensor,
      attention_weights: Tensor) -> Tensor:
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_offsets.shape[1], m * d)


def _sample_no_grad(value: Tensor, x: Tensor, y: Tensor, attn: Tensor) -> Tensor:
    """Eager float32 forward when no gradient is wanted, in about half the elementwise passes of
    :class:`_FusedLevel`'s, with the same result bit for bit from the same pixel coordinates
    ``x``, ``y`` ((N, Lq, M, P) float32, :func:`pixel_coords`; fresh tensors, overwritten here).

    The map is padded by *two* pixels and the cell picked from the coordinate clamped to
    ``[-2, size]``: a sample whose patch misses the map (the CUDA op's masked ones) then lands on a
    patch of padding, which reads zeros, so no mask is built and the attention weights need no
    product with it. Inside the map the clamp changes nothing, so cells and fractions are those of
    :func:`pixel_coords`. Fractions come from the unclamped coordinate, so NaN and infinite ones
    give a NaN output as before (NaN cells point at row 0). x and y come as separate contiguous
    planes, so every pass runs on contiguous planes."""
    n, h, w, m, d = value.shape
    _, lq, _, p = x.shape
    r, wp = n * lq * m, w + 4
    x0 = x.clamp(-2.0, w).floor_()
    y0 = y.clamp(-2.0, h).floor_()
    fx, fy = x.sub_(x0), y.sub_(y0)
    itype = torch.int32 if n * (h + 4) * wp * m < 2 ** 31 else torch.int64
    cell = torch.add(x0, y0, alpha=wp).nan_to_num_(0.0).to(itype)      # exact: (h+4)(w+4) < 2^24
    # padded row of the top-left corner: ((image * (h+4) + y0 + 2) * (w+4) + x0 + 2) * m + head
    base = (torch.arange(n, dtype=itype, device=x.device).view(n, 1, 1, 1) * ((h + 4) * wp * m)
            + torch.arange(m, dtype=itype, device=x.device).view(1, 1, m, 1) + (2 * wp + 2) * m)
    rows = torch.add(base, cell, alpha=m).view(r, p)
    idx = _corner_rows(rows, w + 2, m)                     # the corner offsets of a 2-pixel border
    cw = _corner_weights(fx, fy, attn.reshape(n, lq, m, p))
    return F.embedding_bag(idx, zero_padded(value, 2, 2, 2, 2).view(-1, d), mode="sum", per_sample_weights=cw.view(r, p * 4))


def _fast_path(value: Tensor, loc: Tensor, attn: Tensor) -> bool:
    """:func:`_sample_no_grad` applies: eager, float32, no gradient wanted, cells exact in float32."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or loc.dtype != torch.float32:
        return False
    if grad_wanted(value, loc, attn):
        return False
    _, h, w, _, _ = value.shape
    return (h + 4) * (w + 4) < 2 ** 24


# below both sizes a backward pass is cheaper through grid_sample's (benchmarks/deform_attn.py --pairs cls tsb)
SMALL_TRAINING_SAMPLES = 128 * 1024     # N * Lq * M * L * P sampling points
SMALL_TRAINING_VALUES = 256 * 1024      # N * S * M * D value elements


def _supports(value: Tensor, sampling_locations: Tensor) -> bool:
    """Auto-selection: CPU inference, and CPU training except small eager calls (see below); never
    CUDA, where the Triton kernels (or grid_sample) are used. Under torch.compile always, with or
    without a gradient: forward and backward trace into one graph, and Inductor's loops for them
    beat its decomposition of grid_sample's at every measured shape (the op alone by 3.8-27x; whole
    compiled train steps took 0.98-1.01x the time, docs/performance.md).
    Never under torch.export, whose formats pick their implementation themselves
    (``export.core.DEFAULT_IMPL``).

    Small eager training calls go to grid_sample: this forward is 1.5-3x faster at every measured
    size, but its sort-based backward costs ~0.1 us a sample, while grid_sample's scatter into a small
    value map is cheaper; so when a gradient is needed and both the samples and the value map are
    small (the classifiers' 8-23 px grids, detection at a quarter of its size) grid_sample's
    forward + backward wins (1.25-1.75x on one thread, docs/performance.md)."""
    if value.is_cuda or torch.compiler.is_exporting():
        return False
    if torch.compiler.is_compiling():
        return True
    small = (sampling_locations.numel() // 2 <= SMALL_TRAINING_SAMPLES
             and value.numel() <= SMALL_TRAINING_VALUES)
    return not (grad_wanted(value, sampling_locations) and small)


ms_deform_attn_fused.supports = _supports  # type: ignore[attr-defined]
ms_deform_attn_fused.from_offsets = _from_offsets  # type: ignore[attr-defined]
