import pytest
import torch

from piip.ops import ms_deform_attn


def loop_deform_attn(value, shapes, starts, locs, weights):
    """Independent, deliberately naive implementation: explicit loops over points and corners."""
    n, s, m, d = value.shape
    _, lq, _, nl, p, _ = locs.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(nl):
                    hh, ww = int(shapes[lvl, 0]), int(shapes[lvl, 1])
                    start = int(starts[lvl])
                    for k in range(p):
                        x = float(locs[b, q, h, lvl, k, 0]) * ww - 0.5
                        y = float(locs[b, q, h, lvl, k, 1]) * hh - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= yy < hh and 0 <= xx < ww:
                                    wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    acc += wgt * value[b, start + yy * ww + xx, h]
                        out[b, q, h] += weights[b, q, h, lvl, k] * acc
    return out.reshape(n, lq, m * d)


def random_inputs(shapes, n=2, lq=5, m=2, d=3, p=3, spread=1.6, dtype=torch.float64):
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    s = int((shapes_t[:, 0] * shapes_t[:, 1]).sum())
    value = torch.randn(n, s, m, d, dtype=dtype)
    # locations spread beyond [0, 1] so that out-of-map and border samples are exercised
    locs = (torch.rand(n, lq, m, len(shapes), p, 2, dtype=dtype) - 0.5) * spread + 0.5
    weights = torch.rand(n, lq, m, len(shapes), p, dtype=dtype).softmax(-1)
    return value, shapes_t, starts, locs, weights


@pytest.mark.parametrize("shapes", [[(5, 7)], [(4, 4), (3, 6)], [(1, 9), (6, 2), (2, 2)]])
def test_matches_naive_loops(shapes):
    value, sh, st, locs, w = random_inputs(shapes)
    assert ((locs < 0) | (locs > 1)).any(), "test must include out-of-range locations"
    got = ms_deform_attn(value, sh, st, locs, w, impl="reference")
    want = loop_deform_attn(value, sh, st, locs, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradients_flow_to_all_inputs():
    value, sh, st, locs, w = random_inputs([(4, 5)], n=1, lq=3)
    value.requires_grad_(), locs.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, sh, st, l, a, impl="reference"),
                                    (value, locs, w), eps=1e-6, atol=1e-5)


def test_env_selects_impl(monkeypatch):
    value, sh, st, locs, w = random_inputs([(3, 3)], dtype=torch.float32)
    monkeypatch.setenv("PIIP_DEFORM_IMPL", "does_not_exist")
    with pytest.raises(ValueError, match="does_not_exist"):
        ms_deform_attn(value, sh, st, locs, w)
    monkeypatch.setenv("PIIP_DEFORM_IMPL", "reference")
    assert ms_deform_attn(value, sh, st, locs, w).shape == (2, 5, 6)


def test_shape_errors_are_specific():
    value, sh, st, locs, w = random_inputs([(3, 3)], dtype=torch.float32)
    with pytest.raises(ValueError, match="value has S=9"):
        ms_deform_attn(value, torch.tensor([[3, 4]]), st, locs, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, sh, st, locs, w[..., :2])
    with pytest.raises(ValueError, match=r"\(N, S, M, D\)"):
        ms_deform_attn(value[0], sh, st, locs, w)
