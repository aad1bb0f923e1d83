"""Shape metadata stays Python / symbolic ints: the deformable op takes (h, w) tuples, and a whole
PIIP forward runs on the meta device and under FakeTensorMode (no .item() / .tolist() / cache hit)."""
from __future__ import annotations

import pytest
import torch

import piip
from piip.layers.deform_attn import MSDeformAttn
from piip.ops import available_impls, ms_deform_attn

TINY = dict(img_size=64, deform_num_heads=2,
            branches=[dict(embed_dim=32 * (i + 1), num_heads=2, depth=2, interaction_groups=[[0, 0], [1, 1]],
                           window_sizes=[4, 0]) for i in range(3)])


def _inputs(shapes, n=2, lq=5, m=2, d=4, p=3):
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d)
    loc = torch.rand(n, lq, m, len(shapes), p, 2) * 1.4 - 0.2
    attn = torch.rand(n, lq, m, len(shapes), p).softmax(-1)
    return value, loc, attn


@pytest.mark.parametrize("impl", [i for i in available_impls() if i != "triton"])
def test_op_takes_int_shapes_like_tensors(impl):
    shapes = [(4, 6), (3, 2)]
    value, loc, attn = _inputs(shapes)
    sh = torch.tensor(shapes)
    st = torch.tensor([0, 24])
    want = ms_deform_attn(value, sh, st, loc, attn, impl=impl)
    torch.testing.assert_close(ms_deform_attn(value, tuple(shapes), (0, 24), loc, attn, impl=impl), want)
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, loc, attn, impl=impl), want)  # starts derived
    with pytest.raises(ValueError, match="value has S=30"):
        ms_deform_attn(value, [(4, 6), (3, 3)], None, loc, attn, impl=impl)
    with pytest.raises(ValueError, match=r"\(h, w\) pairs"):
        ms_deform_attn(value, [(4, 6, 1)], None, loc, attn, impl=impl)


def test_module_int_shapes_equal_tensor_shapes():
    m = MSDeformAttn(16, 2, 3, 2)
    q, feat = torch.randn(2, 5, 16), torch.randn(2, 30, 16)
    ref = torch.rand(2, 5, 2, 2)
    a = m(q, ref, feat, torch.tensor([[4, 6], [3, 2]]), torch.tensor([0, 24]))
    torch.testing.assert_close(m(q, ref, feat, ((4, 6), (3, 2))), a)


def _tiny_backbone():
    torch.manual_seed(0)
    return piip.create_model("piip_tsb_1568_1120_672", **TINY).eval()


def test_meta_device_forward():
    """Meta tensors have no data: any read-back (.item(), .tolist(), int(t)) would raise."""
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want = {k: v.shape for k, v in _tiny_backbone()(x).items()}
        with torch.device("meta"):
            model = _tiny_backbone()
        got = model(x.to("meta"))
    assert {k: v.shape for k, v in got.items()} == want
    assert all(v.device.type == "meta" for v in got.values())


def test_fake_tensor_forward():
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = _tiny_backbone()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        want = {k: v.shape for k, v in model(x).items()}
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            got = model(mode.from_tensor(x))
    assert {k: v.shape for k, v in got.items()} == want
