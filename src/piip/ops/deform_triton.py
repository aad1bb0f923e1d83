"""``triton`` deformable attention: forward and backward Triton kernels (JIT, no build step).

One program handles ``BLOCK_R`` rows (a row is one (batch, query, head)) and the whole head
width; it walks the levels and points, reads the 4 bilinear corners of each sample straight
from ``value`` and accumulates. The backward recomputes the corners, scatters the value
gradient with atomic adds and writes analytic location / attention-weight gradients.
Selected automatically for CUDA tensors when Triton imports; on CPU it runs only under
``TRITON_INTERPRET=1`` (how its numerics are tested without a GPU). Math in >= float32.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .ms_deform_attn import ShapesArg, StartsArg, level_layout, register_impl

try:  # Triton ships with the CUDA wheels of torch; the op is simply not offered without it
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if HAS_TRITON:
    @triton.jit
    def _row_block(R, S, LQM, M, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's rows (int64) and head columns with their masks, each row's n*S and head."""
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        return rows, rows < R, cols, cols < D, (rows // LQM) * S, rows % M

    @triton.jit
    def _level(shapes_ptr, starts_ptr, lvl):
        """(H, W, start offset in S) of level ``lvl``."""
        return tl.load(shapes_ptr + 2 * lvl), tl.load(shapes_ptr + 2 * lvl + 1), tl.load(starts_ptr + lvl)

    @triton.jit
    def _corner(x0, y0, fx, fy, dx: tl.constexpr, dy: tl.constexpr, h, w, start, base, m_count):
        """In-map mask, value row (before + head) and x / y bilinear weights of corner (dx, dy)."""
        xi = x0 + dx
        yi = y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        pos = start + yi.to(tl.int64) * w + xi.to(tl.int64)
        pos = tl.where(ok, pos, 0)
        bx = fx if dx == 1 else 1 - fx
        by = fy if dy == 1 else 1 - fy
        return ok, (base + pos) * m_count, bx, by

    @triton.jit
    def _sample(loc_ptr, attn_ptr, k, rmask, hf, wf):
        """Attention weight, bilinear fractions, top-left corner and validity of sample ``k`` (one per row).

        The cell is picked from the float32 pixel coordinate ``loc * size - 0.5`` and a sample counts
        only when ``-1 < coordinate < size``, as in Deformable-DETR's CUDA op (deform_fused.pixel_coords);
        the kernels are launched without mul-add fusion so this product is rounded on its own."""
        lx = tl.load(loc_ptr + 2 * k, mask=rmask, other=0.0)
        ly = tl.load(loc_ptr + 2 * k + 1, mask=rmask, other=0.0)
        a = tl.load(attn_ptr + k, mask=rmask, other=0.0)
        w32 = wf.to(tl.float32)
        h32 = hf.to(tl.float32)
        x32 = lx.to(tl.float32) * w32 - 0.5
        y32 = ly.to(tl.float32) * h32 - 0.5
        valid = (x32 > -1) & (x32 < w32) & (y32 > -1) & (y32 < h32)
        x0f = tl.floor(x32)
        y0f = tl.floor(y32)
        x = lx * wf - 0.5
        y = ly * hf - 0.5
        return a, x - x0f.to(x.dtype), y - y0f.to(y.dtype), x0f.to(tl.int64), y0f.to(tl.int64), valid

    @triton.jit
    def _fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                    R, S, LQM, M, D,
                    L: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows64, rmask, cols, cmask, base, head = _row_block(R, S, LQM, M, D, BLOCK_R, BLOCK_D)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=value_ptr.dtype.element_ty)
        for lvl in tl.static_range(L):
            h, w, start = _level(shapes_ptr, starts_ptr, lvl)
            hf = h.to(acc.dtype)
            wf = w.to(acc.dtype)
            for pt in tl.static_range(P):
                k = rows64 * (L * P) + lvl * P + pt
                a, fx, fy, x0, y0, valid = _sample(loc_ptr, attn_ptr, k, rmask, hf, wf)
                for c in tl.static_range(4):
                    ok, vrow, bx, by = _corner(x0, y0, fx, fy, c % 2, c // 2, h, w, start, base, M)
                    ok = ok & rmask & valid
                    v = tl.load(value_ptr + (vrow + head)[:, None] * D + cols[None, :],
                                mask=ok[:, None] & cmask[None, :], other=0.0)
                    acc += (a * bx * by)[:, None] * v
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                    R, S, LQM, M, D,
                    L: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows64, rmask, cols, cmask, base, head = _row_block(R, S, LQM, M, D, BLOCK_R, BLOCK_D)
        g = tl.load(grad_out_ptr + rows64[:, None] * D + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        for lvl in tl.static_range(L):
            h, w, start = _level(shapes_ptr, starts_ptr, lvl)
            hf = h.to(g.dtype)
            wf = w.to(g.dtype)
            for pt in tl.static_range(P):
                k = rows64 * (L * P) + lvl * P + pt
                a, fx, fy, x0, y0, valid = _sample(loc_ptr, attn_ptr, k, rmask, hf, wf)
                ga = tl.zeros_like(fx)
                gfx = tl.zeros_like(fx)
                gfy = tl.zeros_like(fx)
                for c in tl.static_range(4):
                    ok, vrow, bx, by = _corner(x0, y0, fx, fy, c % 2, c // 2, h, w, start, base, M)
                    ok = ok & rmask & valid
                    sx = 1.0 if c % 2 == 1 else -1.0
                    sy = 1.0 if c // 2 == 1 else -1.0
                    offs = (vrow + head)[:, None] * D + cols[None, :]
                    m2 = ok[:, None] & cmask[None, :]
                    v = tl.load(value_ptr + offs, mask=m2, other=0.0)
                    e = tl.sum(v * g, axis=1)
                    ga += bx * by * e
                    gfx += sx * by * e
                    gfy += sy * bx * e
                    tl.atomic_add(grad_value_ptr + offs, (a * bx * by)[:, None] * g, mask=m2)
                tl.store(grad_attn_ptr + k, ga, mask=rmask)
                tl.store(grad_loc_ptr + 2 * k, a * gfx * wf, mask=rmask)
                tl.store(grad_loc_ptr + 2 * k + 1, a * gfy * hf, mask=rmask)


def _launch_args(value: Tensor, loc: Tensor) -> tuple[int, int, int, int, int, int, int, int]:
    n, s, m, d = value.shape
    lq, nl, p = loc.shape[1], loc.shape[3], loc.shape[4]
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(64, 4096 // block_d))
    return n * lq * m, s, lq * m, m, d, nl, p, block_r, block_d  # type: ignore[return-value]


class _TritonDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                loc: Tensor, attn: Tensor) -> Tensor:
        r, s, lqm, m, d, nl, p, block_r, block_d = _launch_args(value, loc)
        shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        starts = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        out = torch.empty(r, d, dtype=value.dtype, device=value.device)
        _fwd_kernel[(triton.cdiv(r, block_r),)](value, shapes, starts, loc, attn, out, r, s, lqm, m, d,
                                                L=nl, P=p, BLOCK_R=block_r, BLOCK_D=block_d, enable_fp_fusion=False)
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        n, lq = value.shape[0], loc.shape[1]
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        r, s, lqm, m, d, nl, p, block_r, block_d = _launch_args(value, loc)
        grad_out = grad_out.to(value.dtype).contiguous()
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        _bwd_kernel[(triton.cdiv(r, block_r),)](value, shapes, starts, loc, attn, grad_out,
                                                grad_value, grad_loc, grad_attn, r, s, lqm, m, d,
                                                L=nl, P=p, BLOCK_R=block_r, BLOCK_D=block_d, enable_fp_fusion=False)
        return grad_value, None, None, grad_loc, grad_attn


def level_tables(shapes: tuple, starts: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (L, 2) level shapes and (L,) start offsets the kernels read from device memory.

    Eagerly they are made once per layout and device and kept: built per call, each call copied
    them from host memory (a synchronous copy, two for every interaction edge of a forward), and a
    CUDA graph cannot capture such a copy. Traced (symbolic sizes, compile, export) they are built
    in the graph."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or not all(type(v) is int for v in (*(d for hw in shapes for d in hw), *starts))):
        return _tables(shapes, starts, device)
    return _kept_tables(tuple(tuple(hw) for hw in shapes), tuple(starts), device)


def _tables(shapes: tuple, starts: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor([list(hw) for hw in shapes], dtype=torch.int64, device=device),
            torch.tensor(list(starts), dtype=torch.int64, device=device))


@functools.lru_cache(maxsize=256)
def _kept_tables(shapes: tuple, starts: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    # normal tensors even when first made under inference_mode: a training call saves them for backward
    with torch.inference_mode(False):
        return _tables(shapes, starts, device)


def _runnable(value: Tensor) -> bool:
    return HAS_TRITON and (value.is_cuda or interpreting())


def _supports(value: Tensor, sampling_locations: Tensor) -> bool:
    """Auto-selection: CUDA tensors only (the interpreter is for tests, it is slow)."""
    return HAS_TRITON and value.is_cuda


if HAS_TRITON:
    @register_impl("triton")
    def ms_deform_attn_triton(value: Tensor, spatial_shapes: ShapesArg, level_start_index: StartsArg,
                              sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        """Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1); >= float32 math."""
        if not _runnable(value):
            raise ValueError("ms_deform_attn impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), "
                             f"got value on {value.device}")
        dt = torch.promote_types(value.dtype, torch.float32)
        shapes, starts = level_layout(spatial_shapes, level_start_index)
        shapes_t, starts_t = level_tables(shapes, starts, value.device)
        out = _TritonDeformAttn.apply(value.to(dt).contiguous(), shapes_t, starts_t,
                                      sampling_locations.to(dt).contiguous(),
                                      attention_weights.to(dt).contiguous())
        return out.to(value.dtype)

    ms_deform_attn_triton.supports = _supports  # type: ignore[attr-defined]
