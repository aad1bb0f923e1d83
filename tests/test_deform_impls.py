"""Every deformable-attention implementation against the grid_sample reference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from piip.ops import available_impls, ms_deform_attn
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
    from piip.ops.ms_deform_attn import _select_impl
    value = torch.zeros(1, 4, 1, 2)
    assert _select_impl(None, value) == ("fused" if not os.environ.get("PIIP_DEFORM_IMPL") else
                                         os.environ["PIIP_DEFORM_IMPL"])
    value.requires_grad_()
    if not os.environ.get("PIIP_DEFORM_IMPL"):
        assert _select_impl(None, value) == "fused"  # training on CPU too: its backward beats grid_sample's


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


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable in this environment")
@pytest.mark.skipif(interpreting(), reason="already running under TRITON_INTERPRET=1 (tests above cover triton)")
def test_triton_under_interpreter():
    """Triton's numerics on CPU: re-run this file's triton cases with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "triton and not interpreter",
                          "-p", "no:cacheprovider", "-o", "addopts="], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_triton_cuda_matches_reference():
    value, sh, st, loc, attn = make_inputs([(5, 7), (3, 4)], dtype=torch.float32)
    args = [t.cuda() for t in (value, sh, st, loc, attn)]
    out = ms_deform_attn(*args, impl="triton")
    torch.testing.assert_close(out, ms_deform_attn(*args, impl="reference"), atol=1e-5, rtol=1e-5)
