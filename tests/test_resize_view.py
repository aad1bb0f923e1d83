"""The coarser branches' views: integer sizes, the released sampling, and the same sizes in exported graphs."""
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import piip
from piip.ops.resize import _bilinear_by_gather, resize_view, view_ratio, view_size

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_overrides  # noqa: E402

RELEASED = [(1120, 1568), (896, 1568), (672, 1568), (448, 1568), (896, 1120), (448, 1120), (1568, 1792),
            (192, 368), (128, 368), (96, 320), (336, 1024), (672, 1024), (224, 640)]


def test_ratio_survives_float_rescaling():
    """An img_size override rescales every branch in floats (1120/1568 at 64 px: 45.714.../63.999...);
    the exact ratio comes back, and with it the released scale, to the bit."""
    drifted = 0
    for num, den in RELEASED:
        for size in (64, 96, 100, 333, 1024):
            f = size / den
            drifted += (num * f) / (den * f) != num / den
            assert view_ratio(num * f, den * f) == view_ratio(num, den)
            n, d = view_ratio(num * f, den * f)
            assert n / d == num / den
    assert drifted   # the float drift is real: e.g. 45.714.../64 is one ulp below 1120/1568
    assert 45.71428571428571 / 64 != 1120 / 1568 and view_ratio(45.71428571428571, 64) == (5, 7)
    model = piip.create_model("piip_tsb_1568_1120_672", **tiny_overrides("piip_tsb_1568_1120_672", 64))
    assert model.view_ratios == [(1, 1), (5, 7), (3, 7)]
    assert model.scales[1] == 1120 / 1568


def test_eager_view_is_the_released_interpolate():
    """Same values, bit for bit, as F.interpolate(scale_factor=r) wherever its float64 size is exact."""
    torch.manual_seed(0)
    for num, den in RELEASED[:6]:
        for h, w in [(96, 128), (160, 224), (448, 448)]:
            x = torch.randn(2, 3, h, w)
            want = F.interpolate(x, scale_factor=num / den, mode="bilinear", align_corners=False)
            got = resize_view(x, *view_ratio(num, den))
            assert got.shape == want.shape
            assert torch.equal(got, want)


def test_sizes_are_exact_integers():
    for num, den in RELEASED:
        n, d = view_ratio(num, den)
        for h in range(16, 2049, 16):
            assert view_size(h, h + 32, n, d) == ((h * num) // den, ((h + 32) * num) // den)
    # where the float product falls an ulp short of an integer, floor() loses a row; integers do not
    assert int(49 * (1 / 49)) == 0 and view_size(49, 98, 1, 49) == (1, 2)


def test_exported_arithmetic_matches_the_kernel():
    """What an export records (index/lerp ops) equals the native kernel to float32 rounding."""
    torch.manual_seed(0)
    for num, den in [(1120, 1568), (672, 1568), (448, 1120)]:
        x = torch.randn(1, 3, 1568, 800)
        n, d = view_ratio(num, den)
        want = resize_view(x, n, d)
        got = _bilinear_by_gather(x, view_size(1568, 800, n, d), n / d)
        assert (got - want).abs().max().item() < 2e-6


class _View(torch.nn.Module):
    """A branch view from img sizes that drifted an ulp (45.714.../64 < 5/7). With
    F.interpolate(scale_factor=45.71428571428571 / 64) the ONNX model gave 80x114 at 112x160 where
    eager gave 79x114 (float32 vs float64 floor), and a PIIP graph then reshaped the wrong tokens."""
    ratio = view_ratio(45.71428571428571, 64)

    def forward(self, x):
        return resize_view(x, *self.ratio)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_exported_view_follows_every_size(fmt, tmp_path):
    """Exported at 96x128, run at sizes where H*5/7 is an integer (112, 224) and where it is not:
    the graph's sizes equal eager's and the values agree (issue 24's silent wrong-size export)."""
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("ONNX export needs the export extra: pip install 'piip[export]'")
    from torch.export import Dim
    mod = _View().eval()
    h, w = Dim("h", min=1, max=256), Dim("w", min=1, max=256)
    program = torch.export.export(mod, (torch.randn(2, 3, 96, 128),),
                                  dynamic_shapes=({0: Dim("b", min=1, max=8), 2: 16 * h, 3: 16 * w},))
    if fmt == "onnx":
        import onnxruntime as ort
        path = str(tmp_path / "view.onnx")
        torch.onnx.export(program, (), dynamo=True).save(path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])  # noqa: E731
    else:
        run = lambda x: program.module()(x)  # noqa: E731
    for b, hh, ww in [(1, 112, 160), (3, 224, 224), (1, 64, 96), (2, 336, 1568 // 2), (1, 448, 1568)]:
        x = torch.randn(b, 3, hh, ww)
        want = mod(x)
        got = run(x)
        assert tuple(got.shape) == tuple(want.shape) == (b, 3, hh * 5 // 7, ww * 5 // 7)
        assert (got - want).abs().max().item() < 1e-5
