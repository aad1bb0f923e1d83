"""Every deformable-attention implementation against the grid_sample reference."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from piip.ops import available_impls, ms_deform_attn, ms_deform_attn_points
from piip.ops.deform_triton import HAS_TRITON, interpreting

CPU_IMPLS = ["fused"] + (["triton"] if HAS_TRITON and interpreting() else [])


def make_inputs(shapes, n=2, lq=7, m=3, d=5, p=4, dtype=torch.float64, spread=1.6, seed=0):
    """Locations spread beyond [0, 1] so that corners fall off the map on every side."""
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes_t[:, 0] * shapes_t[:, 1]
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(n, int(sizes.sum()), m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * spread - (spread - 1) / 2
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    return value, shapes_t, start, loc, attn


SHAPES = [[(5, 7)], [(4, 6), (3, 2)], [(1, 9)]]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shapes", SHAPES)
def test_agrees_with_reference_float32(impl, shapes):
    value, sh, st, loc, attn = make_inputs(shapes, dtype=torch.float32)
    tensors = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn(tensors[0], sh, st, tensors[1], tensors[2], impl="reference")
    ours_t = [t.clone().detach().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(ours_t[0], sh, st, ours_t[1], ours_t[2], impl=impl)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, tensors, grad), torch.autograd.grad(out, ours_t, grad)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck_float64(impl):
    value, sh, st, loc, attn = make_inputs([(2, 3), (1, 2)], n=1, lq=2, m=2, d=2, p=2)
    args = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, sh, st, l, a, impl=impl), args)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype):
    value, sh, st, loc, attn = make_inputs([(5, 7)], dtype=torch.float32)
    out = ms_deform_attn(value.to(dtype), sh, st, loc.to(dtype), attn.to(dtype), impl=impl)
    ref = ms_deform_attn(value.to(dtype), sh, st, loc.to(dtype), attn.to(dtype), impl="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_selection_env_and_argument(monkeypatch):
    value, sh, st, loc, attn = make_inputs([(5, 7)], dtype=torch.float32)
    assert {"reference", "fused"} <= set(available_impls())
    monkeypatch.setenv("PIIP_DEFORM_IMPL", "fused")
    a = ms_deform_attn(value, sh, st, loc, attn)
    b = ms_deform_attn(value, sh, st, loc, attn, impl="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("PIIP_DEFORM_IMPL", "nope")
    with pytest.raises(ValueError, match="unknown deformable-attention implementation"):
        ms_deform_attn(value, sh, st, loc, attn)


def test_auto_selection_cpu():
    """CPU: ``fused`` for inference; for training too, except when both the samples and the value map
    are small, where grid_sample's backward is the cheaper one (benchmarks/deform_attn.py --pairs cls)."""
    from piip.ops.deform_fused import SMALL_TRAINING_SAMPLES, SMALL_TRAINING_VALUES
    from piip.ops.ms_deform_attn import _select_impl
    forced = os.environ.get("PIIP_DEFORM_IMPL")
    value, loc = torch.zeros(1, 4, 1, 2), torch.zeros(1, 3, 1, 1, 4, 2)
    assert _select_impl(None, value, loc) == (forced or "fused")
    value.requires_grad_()
    assert _select_impl(None, value, loc) == (forced or "reference")        # small training call
    with torch.no_grad():
        assert _select_impl(None, value, loc) == (forced or "fused")        # no gradient: fused
    many = torch.zeros(1, SMALL_TRAINING_SAMPLES // 4 + 1, 1, 1, 4, 2, requires_grad=True)
    assert _select_impl(None, value, many) == (forced or "fused")           # many samples
    wide = torch.zeros(1, SMALL_TRAINING_VALUES // 2 + 1, 1, 2, requires_grad=True)
    assert _select_impl(None, wide, loc) == (forced or "fused")             # a large value map
    assert _select_impl(None, wide[:, :SMALL_TRAINING_VALUES // 2], loc) == (forced or "reference")


def test_auto_selection_while_compiling(monkeypatch):
    """Under torch.compile ``fused`` for training and inference, small calls included (its traced
    forward + backward beat grid_sample's decomposition everywhere); under torch.export never
    (each format picks its implementation)."""
    from piip.ops.ms_deform_attn import _select_impl
    if os.environ.get("PIIP_DEFORM_IMPL"):
        pytest.skip("PIIP_DEFORM_IMPL forces an implementation")
    many = torch.zeros(1, 70_000, 1, 1, 4, 2)                  # not a small call
    few = torch.zeros(1, 3, 1, 1, 4, 2)                        # a small one
    value = torch.zeros(1, 4, 1, 2, requires_grad=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _select_impl(None, value, many) == "fused"          # training
    assert _select_impl(None, value, few) == "fused"           # small training call
    with torch.no_grad():
        assert _select_impl(None, value, many) == "fused"      # inference
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        assert _select_impl(None, value, many) == "reference"  # export


def test_fused_compiled_training_one_dynamic_graph():
    """``fused`` under torch.compile with a gradient: one graph (fullgraph) whose batch is symbolic
    from the first call, forward and the three gradients equal to the eager op's for two batch
    sizes without a recompile. ``aot_eager`` traces the compiler-facing backward (gather-reduce
    for the corner dots, index_add_ for the value gradient) as Inductor sees it; the Inductor
    codegen of that graph runs in test_compile's training test."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    shapes, starts = ((6, 5),), (0,)

    def op(value, loc, attn):
        return ms_deform_attn(value, shapes, starts, loc, attn, impl="fused")

    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (2, 3):
        value = torch.randn(n, 30, 2, 4, requires_grad=True)
        loc = (torch.rand(n, 7, 2, 1, 4, 2) * 1.4 - 0.2).requires_grad_()   # some samples off the map
        attn = torch.rand(n, 7, 2, 1, 4).softmax(-1).requires_grad_()
        for t in (value, loc, attn):
            torch._dynamo.mark_dynamic(t, 0)
        want = op(value, loc, attn)
        got = compiled(value, loc, attn)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        grad = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, (value, loc, attn), grad),
                        torch.autograd.grad(want, (value, loc, attn), grad)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_far_off_map_locations(impl):
    """Locations far outside the map (and exactly on its border) read zeros like grid_sample."""
    value, sh, st, loc, attn = make_inputs([(4, 5)], dtype=torch.float32)
    loc = loc.clone()
    loc[:, 0] = 1e6
    loc[:, 1] = -1e6
    loc[:, 2] = 0.0
    loc[:, 3] = 1.0
    tensors = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ours = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn(tensors[0], sh, st, tensors[1], tensors[2], impl="reference")
    out = ms_deform_attn(ours[0], sh, st, ours[1], ours[2], impl=impl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[:, :2].abs().max() == 0
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, tensors, grad), torch.autograd.grad(out, ours, grad)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.heavy
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable in this environment")
@pytest.mark.skipif(interpreting(), reason="already running under TRITON_INTERPRET=1 (tests above cover triton)")
def test_triton_under_interpreter():
    """Triton's numerics on CPU: re-run this file's triton cases with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "triton and not interpreter",
                          "-p", "no:cacheprovider", "-o", "addopts="], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="runs in test_triton_under_interpreter's subprocess")
def test_triton_level_tables_kept_and_trainable():
    """The level table is made once per layout (no host-to-device copy per call, which a CUDA graph
    could not capture) and stays usable for training after a first call under inference_mode."""
    from piip.ops.deform_triton import level_tables
    value, sh, st, loc, attn = make_inputs([(5, 7), (3, 4)], dtype=torch.float32)
    shapes, starts = ((5, 7), (3, 4)), (0, 35)
    with torch.inference_mode():
        first = level_tables(shapes, starts, value.device)
        out_inf = ms_deform_attn(value, shapes, starts, loc, attn, impl="triton")
    again = level_tables(shapes, starts, value.device)
    assert all(a is b for a, b in zip(first, again)) and not any(t.is_inference() for t in first)
    assert first[0].tolist() == [[5, 7], [3, 4]] and first[1].tolist() == [0, 35]
    tensors = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(tensors[0], shapes, starts, tensors[1], tensors[2], impl="triton")
    out.sum().backward()
    torch.testing.assert_close(out.detach(), out_inf)
    assert all(t.grad is not None for t in tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_triton_cuda_matches_reference():
    value, sh, st, loc, attn = make_inputs([(5, 7), (3, 4)], dtype=torch.float32)
    args = [t.cuda() for t in (value, sh, st, loc, attn)]
    out = ms_deform_attn(*args, impl="triton")
    torch.testing.assert_close(out, ms_deform_attn(*args, impl="reference"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- which cell a sample on a pixel centre uses
def deformable_detr_init_locations(shapes, heads=8, points=4):
    """Sampling locations of a freshly initialised Deformable-DETR encoder layer, built as it builds them:
    float32 reference points at pixel centres (linspace(0.5, size - 0.5) / size, valid ratio 1) plus the
    sampling-offset bias (head directions scaled to unit max-norm, times 1..points) over (W, H)."""
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack([rx.reshape(-1) / w, ry.reshape(-1) / h], -1))
    ref = torch.cat(refs)[None]                                             # (1, Lq, 2)
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(heads, 1, 1, 2).repeat(1, len(shapes), points, 1)
    for i in range(points):
        grid[:, :, i] *= i + 1
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    return ref[:, :, None, None, None] + grid[None, None] / normalizer[None, None, None, :, None]


def cuda_convention(value, shapes, starts, loc, attn):
    """Deformable-DETR's CUDA op written with gathers and autograd: cell = floor(float32(loc * size) - 0.5),
    a sample counts when -1 < coordinate < size, corners off the map read zero."""
    n, _, m, d = value.shape
    lq, p = loc.shape[1], loc.shape[4]
    out = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes.tolist(), starts.tolist())):
        v = value[:, start:start + h * w].permute(0, 2, 1, 3)               # (N, M, HW, D)
        lx, ly = loc[:, :, :, lvl, :, 0], loc[:, :, :, lvl, :, 1]
        x32, y32 = lx.float() * w - 0.5, ly.float() * h - 0.5
        valid = (x32 > -1) & (x32 < w) & (y32 > -1) & (y32 < h)
        x0, y0 = x32.floor().to(loc.dtype), y32.floor().to(loc.dtype)
        fx, fy = lx * w - 0.5 - x0, ly * h - 0.5 - y0
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                ok = valid & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().permute(0, 2, 1, 3).reshape(n, m, -1)
                picked = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, d)).view(n, m, lq, p, d)
                wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * attn[:, :, :, lvl] * ok
                out = out + (wgt[..., None] * picked.permute(0, 2, 1, 3, 4)).sum(3)
    return out.reshape(n, lq, m * d)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_centre_cell_as_cuda_op(impl, dtype):
    """At Deformable-DETR's initial locations (on pixel centres, where the bilinear location gradient
    has a kink) the location gradient is the CUDA op's one-sided gradient, in float32 and float64."""
    shapes = [(6, 5), (3, 3), (2, 2)]
    loc = deformable_detr_init_locations(shapes, heads=8, points=3).to(dtype)
    sh = torch.tensor(shapes)
    st = torch.tensor([0, 30, 39])
    # the float32 coordinate of many samples lands just below a cell border: floor picks the left cell
    x32 = loc[..., 0, :, 0].float() * 5 - 0.5
    assert ((x32 - x32.round()).abs() < 1e-5).any() and ((x32.floor() != x32.round()) & ((x32 - x32.round()).abs() < 1e-5)).sum() > 10
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 43, 8, 4, generator=g, dtype=dtype)
    attn = torch.rand(loc.shape[:-1], generator=g, dtype=dtype)
    ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(ins[0], sh, st, ins[1], ins[2], impl=impl)
    expect = cuda_convention(ref[0], sh, st, ref[1], ref[2])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, expect, **tol)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    for ours, theirs in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(expect, ref, grad)):
        torch.testing.assert_close(ours, theirs, **{k: v * 10 for k, v in tol.items()})


def test_reference_cell_at_pixel_centres_is_grid_samples():
    """``reference`` (grid_sample) rounds ((2 loc - 1) + 1) * size - 1) / 2 instead: same values and
    value / weight gradients, but at some pixel-centre samples it takes the other one-sided location
    gradient. Documented, not a bug of either: the function has a kink there."""
    shapes = [(6, 5)]
    loc = deformable_detr_init_locations(shapes, heads=8, points=3)
    sh, st = torch.tensor(shapes), torch.tensor([0])
    g = torch.Generator().manual_seed(1)
    value = torch.randn(1, 30, 8, 4, generator=g)
    attn = torch.rand(loc.shape[:-1], generator=g)
    a = [t.clone().requires_grad_() for t in (value, loc, attn)]
    b = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out_ref = ms_deform_attn(a[0], sh, st, a[1], a[2], impl="reference")
    out_cuda = cuda_convention(b[0], sh, st, b[1], b[2])
    torch.testing.assert_close(out_ref, out_cuda, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out_ref.shape, generator=g)
    ga, gb = torch.autograd.grad(out_ref, a, grad), torch.autograd.grad(out_cuda, b, grad)
    torch.testing.assert_close(ga[0], gb[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ga[2], gb[2], atol=1e-4, rtol=1e-4)
    differ = ((ga[1] - gb[1]).abs() > 1e-3).any(-1)
    assert 0 < differ.sum() < differ.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_patch_rows_and_corner_tables(dtype):
    """``fused``'s geometry, written for few passes eagerly (patch rows from one float op and one
    integer op; corner weights and rows without a last-dim stack), equals the plain formulas:
    row = ((b * (H+2) + y0+1) * (W+2) + x0+1) * M + head for samples whose patch touches the
    padded map, the padded corner (0, 0) of their image and head for the rest (out of map, far off,
    NaN; their weight is 0), and the bilinear weights of the 4 corners."""
    from piip.ops import deform_fused as df
    n, lq, m, p, h, w = 2, 7, 3, 4, 5, 6
    g = torch.Generator().manual_seed(0)
    loc = (torch.rand(n, lq, m, p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3).to(dtype)
    loc[0, 0, 0, 0] = float("nan")
    loc[1, 1, 1, 1] = torch.tensor([40.0, -35.0], dtype=dtype)
    geo = df._geometry(loc, h, w)
    x = (loc[..., 0].float() * w - 0.5).double()
    y = (loc[..., 1].float() * h - 0.5).double()
    inside = (x > -1) & (x < w) & (y > -1) & (y < h)
    b = torch.arange(n).view(n, 1, 1, 1)
    head = torch.arange(m).view(1, 1, m, 1)
    want = ((b * (h + 2) + y.floor() + 1) * (w + 2) + x.floor() + 1) * m + head
    want = torch.where(inside, want, b * (h + 2) * (w + 2) * m + head).long()
    assert geo.rows.dtype == torch.int32 and torch.equal(geo.rows.long(), want.view(-1, p))
    assert torch.equal(geo.inside.bool(), inside.view(-1, p))
    assert 0 < int(inside.sum()) < inside.numel()
    a = torch.rand(n * lq * m, p, generator=g, dtype=torch.float64).to(dtype)
    fx, fy = geo.fx, geo.fy
    cw = df._corner_weights(fx, fy, a)
    want_cw = torch.stack([a * (1 - fx) * (1 - fy), a * fx * (1 - fy), a * (1 - fx) * fy, a * fx * fy], -1)
    torch.testing.assert_close(cw, want_cw, equal_nan=True)   # (the NaN location: NaN fractions)
    offs = torch.tensor(df._corner_offsets(w, m))
    assert torch.equal(df._corner_rows(geo.rows, w, m).long(), (geo.rows.long()[..., None] + offs).view(-1, p * 4))


def test_fused_inference_path_equals_the_training_forward():
    """Without a gradient, eager float32 ``fused`` takes ``_sample_no_grad`` (a two-pixel zero
    border and clamped cells instead of a mask). It must give the training forward's output bit for
    bit: samples inside, partly off and far off the map, on pixel centres (x = -1 exactly, which
    the CUDA op masks), NaN and infinite coordinates (NaN outputs in both), several images and heads."""
    from piip.ops import deform_fused as df
    n, lq, m, p, d = 3, 40, 4, 4, 5
    for h, w in [(5, 6), (1, 9), (7, 1)]:
        g = torch.Generator().manual_seed(h * 10 + w)
        value = torch.randn(n, h * w, m, d, generator=g)
        loc = torch.rand(n, lq, m, 1, p, 2, generator=g) * 1.8 - 0.4
        attn = torch.rand(n, lq, m, 1, p, generator=g)
        loc[0, 0, 0, 0, 0] = torch.tensor([-0.5 / w, 0.5 / h])             # x = -1, y = 0 exactly
        loc[0, 1, 1, 0, 1] = torch.tensor([(w + 0.5) / w, 0.3])            # x = w exactly
        loc[1, 2, 0, 0, 2, 0] = float("nan")
        loc[2, 3, 2, 0, 3, 1] = float("inf")
        loc[2, 4, 3, 0, 0, 0] = -float("inf")
        loc[1, 5, 1, 0, 1] = torch.tensor([1e6, -1e6])
        taken = []
        real = df._sample_no_grad
        try:
            df._sample_no_grad = lambda *a: taken.append(1) or real(*a)
            with torch.no_grad():
                fast = ms_deform_attn(value, [(h, w)], None, loc, attn, impl="fused")
            trained = ms_deform_attn(value.clone().requires_grad_(), [(h, w)], None, loc, attn, impl="fused")
        finally:
            df._sample_no_grad = real
        assert len(taken) == 1                       # only the call without a gradient
        assert torch.equal(fast.isnan(), trained.isnan()) and 0 < int(fast.isnan().sum()) < fast.numel()
        fin = ~fast.isnan()
        assert torch.equal(fast[fin], trained.detach()[fin])
        ref = ms_deform_attn(value, [(h, w)], None, loc.nan_to_num(0.5, 0.5, 0.5), attn, impl="reference")
        torch.testing.assert_close(fast[fin], ref[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes", [[(5, 7)], [(4, 6), (3, 2)]])
@pytest.mark.parametrize("ref_batch", [1, 2])
def test_point_form_equals_the_locations(shapes, ref_batch):
    """``ms_deform_attn_points(ref, offsets)`` samples at ``ref + offsets / (W, H)``: on every
    implementation, eagerly (``fused`` from pixel offsets directly, to float rounding) and with a
    gradient (the locations path, exactly); a reference tensor of the wrong shape is refused."""
    from piip.ops import deform_fused as df
    value, shapes_t, start, _, attn = make_inputs(shapes, dtype=torch.float32)
    n, lq, m, lvl, p = attn.shape
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(ref_batch, lq, lvl, 2, generator=g)
    offsets = torch.randn(n, lq, m, lvl, p, 2, generator=g) * 3        # pixels: some points fall off
    wh = shapes_t.flip(-1).float().view(lvl, 1, 2)
    loc = ref[:, :, None, :, None, :] + offsets / wh
    for impl in available_impls():
        if impl == "triton" and not interpreting():
            continue
        want = ms_deform_attn(value, shapes, None, loc, attn, impl=impl)
        got = ms_deform_attn_points(value, shapes, None, ref, offsets, attn, impl=impl)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    taken, real = [], df._sample_no_grad
    try:
        df._sample_no_grad = lambda *a: taken.append(1) or real(*a)
        with torch.no_grad():
            fast = ms_deform_attn_points(value, shapes, None, ref, offsets, attn)
        trained = ms_deform_attn_points(value.clone().requires_grad_(), shapes, None, ref, offsets, attn)
    finally:
        df._sample_no_grad = real
    assert len(taken) == lvl                     # the eager call only, one per level
    assert torch.equal(trained.detach(), ms_deform_attn(value.clone().requires_grad_(), shapes, None,
                                                        loc, attn).detach())
    torch.testing.assert_close(fast, trained.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reference_points must be"):
        ms_deform_attn_points(value, shapes, None, ref[:, :, :1] if lvl > 1 else ref[..., :1], offsets, attn)
