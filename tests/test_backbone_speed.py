"""Speed-related behaviour of the backbone: same outputs whichever deform implementation,
bf16 autocast end to end, cached per-shape constants (Inductor's numerics: tests/test_compile.py)."""
from __future__ import annotations

import pytest
import torch

import piip

TINY = dict(img_size=128, branches={"embed_dim": 32, "num_heads": 2}, deform_num_heads=2)


def tiny(**kw):
    torch.manual_seed(0)
    return piip.create_model("piip_tsb_1120_896_448", **{**TINY, **kw}).eval()


def test_fused_and_reference_give_same_backbone_outputs(monkeypatch):
    model, x = tiny(), torch.randn(1, 3, 128, 128)
    outs = {}
    for impl in ("reference", "fused"):
        monkeypatch.setenv("PIIP_DEFORM_IMPL", impl)
        with torch.no_grad():
            outs[impl] = model(x)
    for k in outs["reference"]:
        torch.testing.assert_close(outs["fused"][k], outs["reference"][k], atol=1e-5, rtol=1e-5)


def test_training_step_with_fused_impl(monkeypatch):
    monkeypatch.setenv("PIIP_DEFORM_IMPL", "fused")
    model = tiny().train()
    out = model(torch.randn(2, 3, 128, 128))
    sum(v.float().mean() for v in out.values()).backward()
    grads = [p.grad for n, p in model.named_parameters() if "sampling_offsets" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_end_to_end():
    model, x = tiny(), torch.randn(1, 3, 128, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    for k, v in out.items():
        assert torch.isfinite(v.float()).all()
        assert v.shape == ref[k].shape
        rel = (v.float() - ref[k]).norm() / ref[k].norm()
        assert rel < 0.1, f"level {k}: bf16 autocast relative error {rel:.3f}"


def test_per_shape_constants_are_cached():
    """Only the resized position table, eagerly (deform_inputs is rebuilt from the sizes: traceable)."""
    model = tiny()
    branch = model.branches[1]
    with torch.no_grad():
        a = branch.pos_embed_for((3, 3))
        assert branch.pos_embed_for((3, 3)) is a  # eval: resized table reused
        branch.pos_embed.add_(1.0)               # parameter changed: cache invalidated
        assert branch.pos_embed_for((3, 3)) is not a


def test_position_tables_kept_per_parameter_are_bounded():
    """One kept table per input size, the last POS_TABLES_KEPT sizes only (a detector evaluating
    COCO sees a new size with nearly every image)."""
    from piip.branches.vit import POS_TABLES_KEPT
    from piip.ops import derived
    branch = tiny().branches[1]
    sizes = [(3, 3 + i) for i in range(POS_TABLES_KEPT + 3)]
    with torch.no_grad():
        tables = [branch.pos_embed_for(hw) for hw in sizes]
        kept = [k for k in derived._CACHE if k[0] == "pos_table" and k[2][0] == branch.pos_embed.data_ptr()]
        assert len(kept) == POS_TABLES_KEPT
        assert branch.pos_embed_for(sizes[-1]) is tables[-1]          # a recent size: kept
        again = branch.pos_embed_for(sizes[0])                        # the oldest: dropped, recomputed
        assert again is not tables[0]
        torch.testing.assert_close(again, tables[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pyramid_gemm_upsample_matches_conv_transpose(layout):
    """Upsample2x (GEMM + pixel shuffle) == nn.ConvTranspose2d(k=2, s=2): outputs and all gradients."""
    from piip.layers.pyramid import Upsample2x
    torch.manual_seed(0)
    up = Upsample2x(8, 12)
    ref = torch.nn.ConvTranspose2d(8, 12, 2, 2)
    ref.load_state_dict(up.state_dict())
    x = torch.randn(2, 8, 5, 7)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = up(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    (ya * yb.detach()).sum().backward()
    (yb * yb.detach()).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(up.weight.grad, ref.weight.grad)
    torch.testing.assert_close(up.bias.grad, ref.bias.grad)
    with torch.no_grad():   # the one-pass inference path
        torch.testing.assert_close(up(x), ref(x))


def test_pyramid_upsample_keeps_its_gemm_weight_until_the_weight_changes(monkeypatch):
    """Inference reuses the GEMM layout of the weight (``piip.ops.derived``); a changed weight (in
    place, as load_state_dict copies it) is laid out again; training never uses the kept one."""
    from piip.layers import pyramid
    from piip.layers.pyramid import Upsample2x
    torch.manual_seed(0)
    up = Upsample2x(8, 12)
    ref = torch.nn.ConvTranspose2d(8, 12, 2, 2)
    ref.load_state_dict(up.state_dict())
    made = []
    real = pyramid._gemm_weight
    monkeypatch.setattr(pyramid, "_gemm_weight", lambda weight: made.append(1) or real(weight))
    x = torch.randn(2, 8, 5, 7)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(up(x), ref(x))
    assert len(made) == 1
    new = {k: torch.randn_like(v) for k, v in up.state_dict().items()}
    up.load_state_dict(new)
    ref.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(up(x), ref(x))
    assert len(made) == 2
    up(x).sum().backward()                 # training: laid out from the parameter, with its gradient
    assert len(made) == 3 and up.weight.grad is not None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with torch.no_grad():
        up.weight.add_(0)                  # a new weight state: the next call lays it out again
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():     # a shape pass keeps nothing
        up(torch.empty(2, 8, 5, 7))
    with torch.no_grad():
        torch.testing.assert_close(up(x), ref(x))


def test_convffn_depthwise_conv_stays_channels_last():
    """The ConvFFN's token map is channels-last strided. In eager inference its depthwise conv gets
    a channels-last weight (layers/conv.py), so the output is token-major without a copy (a
    default-strided (C, 1, 3, 3) weight made the conv copy to NCHW and back); it equals the stock
    NCHW conv, training gets the stock gradients, and hooks on the conv still see it run."""
    from piip.layers.mlp import DWConv
    torch.manual_seed(0)
    m = DWConv(8)
    x = torch.randn(2, 35, 8, requires_grad=True)
    y = m(x, (5, 7))
    want = m.dwconv(x.transpose(1, 2).reshape(2, 8, 5, 7).contiguous()).flatten(2).transpose(1, 2)
    torch.testing.assert_close(y, want)
    gy, gw = torch.autograd.grad(y.square().sum(), (x, m.dwconv.weight))
    gy2, gw2 = torch.autograd.grad(want.square().sum(), (x, m.dwconv.weight))
    torch.testing.assert_close(gy, gy2)
    torch.testing.assert_close(gw, gw2)
    with torch.no_grad():
        x2 = torch.randn(1, 64, 8)
        conv_out = []
        m.dwconv.register_forward_hook(lambda mod, i, o: conv_out.append(o))
        assert torch.equal(m(x2, (8, 8)), m.dwconv(x2.transpose(1, 2).reshape(1, 8, 8, 8)).flatten(2).transpose(1, 2))
        assert len(conv_out) == 2                      # the hook saw both calls
        m.dwconv._forward_hooks.clear()
        seen = []
        real = torch.nn.functional.conv2d

        def spy(inp, weight, *args):
            out = real(inp, weight, *args)
            seen.append((weight.is_contiguous(memory_format=torch.channels_last) and weight.stride(1) == 1,
                         out.is_contiguous(memory_format=torch.channels_last)))
            return out
        torch.nn.functional.conv2d = spy
        try:
            y2 = m(x2, (8, 8))
        finally:
            torch.nn.functional.conv2d = real
        assert seen == [(True, True)] and y2.is_contiguous()


def test_conv2d_keeps_channels_last_maps_and_follows_weight_changes():
    """layers.conv.Conv2d: in inference a channels-last map gives a channels-last output equal to
    nn.Conv2d's (the kept weight); an NCHW map takes the stock call; a weight loaded in place is
    used at the next call; training gets the stock call and its gradients."""
    from piip.layers.conv import Conv2d
    torch.manual_seed(0)
    conv, ref = Conv2d(16, 24, 3, padding=1), torch.nn.Conv2d(16, 24, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x_cl = torch.randn(2, 7 * 9, 16).transpose(1, 2).reshape(2, 16, 7, 9)      # tokens viewed as a map
    x = x_cl.contiguous()
    with torch.no_grad():
        y = conv(x_cl)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
        assert conv(x).is_contiguous()                                        # NCHW in, NCHW out
        new = {k: torch.randn_like(v) for k, v in conv.state_dict().items()}
        conv.load_state_dict(new)
        ref.load_state_dict(new)
        torch.testing.assert_close(conv(x_cl), ref(x), atol=1e-5, rtol=1e-5)
    xa, xb = x_cl.clone().requires_grad_(), x.clone().requires_grad_()
    conv(xa).square().sum().backward()
    ref(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
