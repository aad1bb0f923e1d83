"""piip.ops.winograd: F(2x2, 3x3) convolution of channels-last maps, as the merge's Conv2d uses it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import piip
from piip.layers.conv import Conv2d
from piip.ops import winograd


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _spy(monkeypatch) -> list:
    """The calls of ``winograd.conv3x3`` from here on (one entry each)."""
    calls: list = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _stock_then_winograd(monkeypatch, model: torch.nn.Module, x: torch.Tensor):
    """``model(x)`` without Winograd, then with it taken at every width (the tiny models are
    narrower than ``MIN_CHANNELS``): both outputs and the Winograd calls of the second."""
    with torch.no_grad():
        previous = winograd.set_enabled(False)
        try:
            ref = model(x)
        finally:
            winograd.set_enabled(previous)
        monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
        calls = _spy(monkeypatch)
        return ref, model(x), calls


@pytest.mark.parametrize("b,c,co,h,w,bias", [(1, 8, 8, 5, 7, True), (2, 16, 12, 6, 6, False), (1, 4, 8, 1, 3, True),
                                             (3, 8, 4, 9, 2, False), (1, 24, 16, 14, 14, True)])
def test_matches_float64_convolution(b, c, co, h, w, bias):
    """Odd and even sizes (a cropped last tile), batches, with and without bias: within float32
    rounding of a float64 convolution, returned channels-last."""
    g = torch.Generator().manual_seed(b * 100 + h)
    x = _cl(torch.randn(b, c, h, w, generator=g))
    weight = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bs = torch.randn(co, generator=g) if bias else None
    ref = F.conv2d(x.double(), weight.double(), None if bs is None else bs.double(), padding=1)
    out = winograd.conv3x3(x, weight, bs, transformed=winograd.filter_transform(weight))
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    direct = F.conv2d(x, weight, bs, padding=1)
    assert (direct.double() - ref).abs().max() <= 2e-6 * ref.abs().max()


def test_bands_of_tile_rows_give_the_same_output(monkeypatch):
    """A working-set bound small enough for one tile row a band (and odd sizes, a batch of two)
    gives the one-band output exactly (each band's arithmetic is the same)."""
    g = torch.Generator().manual_seed(5)
    x = _cl(torch.randn(2, 16, 11, 9, generator=g))
    weight, bias = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
    u = winograd.filter_transform(weight)
    whole = winograd.conv3x3(x, weight, bias, transformed=u)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)
    assert torch.equal(winograd.conv3x3(x, weight, bias, transformed=u), whole)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 16 * 2 * 5 * 16 * 4 * 2)     # two tile rows a band
    assert torch.equal(winograd.conv3x3(x, weight, bias, transformed=u), whole)


def test_applies_only_where_it_pays_and_matches():
    w = torch.zeros(384, 384, 3, 3)
    x = _cl(torch.zeros(1, 384, 6, 6))
    assert winograd.applies(x, w, None, 1, 1, 1, 1)
    assert winograd.applies(x, w, None, (1, 1), [1, 1], 1, 1)
    assert not winograd.applies(x, w, None, 2, 1, 1, 1)              # stride
    assert not winograd.applies(x, w, None, 1, 0, 1, 1)              # padding
    assert not winograd.applies(x, w, None, 1, 1, 2, 1)              # dilation
    assert not winograd.applies(x, w[:, :192], None, 1, 1, 1, 2)     # groups
    assert not winograd.applies(x, torch.zeros(384, 384, 1, 1), None, 1, 1, 1, 1)
    assert not winograd.applies(x, torch.zeros(256, 384, 3, 3), None, 1, 1, 1, 1)   # narrower than MIN_CHANNELS
    assert not winograd.applies(x.double(), w.double(), None, 1, 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):                # autocast decides the conv's precision
        assert not winograd.applies(x, w, None, 1, 1, 1, 1)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):                             # counted as the convolution it is
        assert not winograd.applies(x, w, None, 1, 1, 1, 1)
    assert not winograd.applies(x, w.requires_grad_(), None, 1, 1, 1, 1)
    w.requires_grad_(False)
    with torch.inference_mode():
        made_here = torch.zeros(384, 384, 3, 3)                      # no version counter: not kept
    assert not winograd.applies(x, made_here, None, 1, 1, 1, 1)
    previous = winograd.set_enabled(False)
    try:
        assert not winograd.applies(x, w, None, 1, 1, 1, 1)
    finally:
        winograd.set_enabled(previous)


def test_conv2d_layer_takes_it_eagerly_and_refolds_after_a_change(monkeypatch):
    """The layer's eager no-grad call goes through Winograd (the filter transform kept), for a
    channels-last map and a default-strided one alike; training keeps the stock call, and an
    in-place change of the weight is seen."""
    torch.manual_seed(0)
    conv = Conv2d(384, 384, 3, padding=1, bias=True)
    x = _cl(torch.randn(1, 384, 7, 5))
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        out = conv(x)
        assert calls == [1] and (out.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
        conv.weight.mul_(2.0)
        conv.bias.mul_(2.0)
        assert torch.allclose(conv(x), 2 * out, rtol=1e-5, atol=1e-5 * out.abs().max().item())
        nchw = conv(x.contiguous())                                 # an NCHW map: Winograd too
        assert len(calls) == 3 and torch.equal(nchw, conv(x))
    y = conv(x)                                                     # a gradient is wanted: stock call
    assert len(calls) == 4 and y.requires_grad


def test_merge_output_with_winograd_equals_stock(monkeypatch):
    """A tiny as-built PIIP-TSB (its merge convs made eligible by lowering the width bound): the
    backbone's maps equal the stock convolution's to float rounding."""
    from conftest import tiny_overrides
    torch.manual_seed(0)
    model = piip.create_model("piip_tsb_1120_896_448", **tiny_overrides("piip_tsb_1120_896_448", 128)).eval()
    x = torch.randn(1, 3, 128, 128)     # every branch's map wider than 1x1 (else it is not channels-last only)
    ref, out, calls = _stock_then_winograd(monkeypatch, model, x)
    assert len(calls) == 6          # 2 convs a branch, 3 branches
    for k in ref:
        assert (out[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max()


def test_compiled_inference_takes_the_opaque_op(monkeypatch):
    """Compiled CPU inference calls ``piip::winograd_conv3x3`` (fake output channels-last like the
    real one) and equals eager; training graphs keep the stock convolution."""
    torch.library.opcheck(winograd.conv3x3_op, (_cl(torch.randn(2, 8, 5, 7)), torch.randn(6, 8, 3, 3), torch.randn(6)))
    torch.library.opcheck(winograd.conv3x3_op, (torch.randn(1, 8, 4, 4), torch.randn(8, 8, 3, 3), None))
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
                                Conv2d(16, 8, 3, padding=1)).eval()
    x = _cl(torch.randn(2, 8, 9, 6))

    def count(gm, inputs):
        seen.append(sum(str(n.target) == "piip.winograd_conv3x3.default" for n in gm.graph.nodes))
        return gm
    torch._dynamo.reset()
    try:
        seen: list = []
        with torch.no_grad():
            ref = model(x)
            out = torch.compile(model, fullgraph=True, backend=count)(x)
        assert seen == [2]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        seen = []
        torch.compile(model.train(), fullgraph=True, backend=count)(x)
        assert seen == [0]
    finally:
        torch._dynamo.reset()


def test_segmentor_head_takes_it_and_matches(monkeypatch):
    """The UperNet head's convs are piip Conv2d (same keys as transformers'); with the width bound
    lowered for a tiny head its 3x3 convs take Winograd in eval and the logits match stock."""
    from piip.tasks.configs import SegmentorConfig
    from piip.tasks.segmentation import build_segmentor
    from conftest import tiny_overrides
    torch.manual_seed(0)
    seg = build_segmentor("piip_tsb_896_448_336_seg", 5, SegmentorConfig(channels=32, aux_channels=16),
                          **tiny_overrides("piip_tsb_896_448_336_seg")).eval()
    assert all(type(m.conv) is Conv2d for m in seg.decode_head.fpn_convs)
    ref, out, calls = _stock_then_winograd(monkeypatch, seg, torch.rand(1, 3, 64, 64))
    assert len(calls) >= 5          # PPM bottleneck, 3 FPN convs, the fuse (+ the backbone merge's)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
