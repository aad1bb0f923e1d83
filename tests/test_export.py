"""torch.export / ONNX export with dynamic batch, H and W, per family (ViT backbone, ConvNeXt-ViT
hybrid, classifier, UperNet segmentor): ``export_model`` runs the written file (torch.export.load /
onnxruntime) at two sizes other than the example's and compares with eager (1e-4 relative);
the tests check that it did, and run the file once more at a third size themselves.
Then ``piip export`` and its one-line errors. Models are depth 1, widths 32-96."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import piip
from piip.cli import main
from piip.export import export_model, relative_error

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxscript / onnxruntime not installed (piip[export])")


def tiny(name: str, **kw):
    cfg = piip.get_config(name)
    branches = [dict(embed_dim=32 * (i + 1), num_heads=2, depth=1, interaction_groups=[[0, 0]], window_sizes=[0])
                if b.kind == "vit" else
                dict(stage_dims=[32, 32, 64, 64], stage_depths=[1, 1, 1, 1], interaction_groups=[[0, 6]])
                for i, b in enumerate(cfg.branches)]
    extra = {"out_groups": None} if cfg.out_groups else {}
    torch.manual_seed(0)
    return piip.create_model(name, img_size=64, branches=branches, deform_num_heads=2, **extra, **kw).eval()


def _run_again(path: str, fmt: str, model, size):
    """The written file at one more size, against eager."""
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        want = model(x)
    want = list(want.values()) if isinstance(want, dict) else [want]
    if fmt == "pt2":
        got = list(torch.export.load(path).module()(x))
    else:
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()})]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and relative_error(g, w) <= 1e-4


def _exported(model, fmt, path, size, again):
    result = export_model(model, fmt, str(path), size)
    assert path.is_file() and result.dynamic
    assert len(result.checks) == 2 and all(s[1:] != size for s, _ in result.checks)
    assert all(err <= 1e-4 for _, err in result.checks), result.checks
    assert result.inputs == [("images", "batch x 3 x H x W")]
    _run_again(str(path), fmt, model, again)
    return result


@pytest.mark.heavy
def test_pt2_vit_backbone(tmp_path):
    model = tiny("piip_tsb_1568_1120_672")
    r = _exported(model, "pt2", tmp_path / "tsb.pt2", (96, 128), (160, 96))
    assert [n for n, _ in r.outputs] == ["stride4", "stride8", "stride16", "stride32"]
    assert r.outputs[0][1] == "batch x 96 x H/4 x W/4"


def tiny_hybrid():
    """ConvNeXt / ViT / ConvNeXt with regular-FPN merging: 4 interaction groups, out_groups 0-2 kept."""
    conv = dict(stage_depths=[1, 1, 1, 1], interaction_groups=[[0, 0], [1, 2], [3, 4], [5, 6]])
    branches = [dict(conv, stage_dims=[32, 32, 64, 64]),
                dict(embed_dim=64, num_heads=2, depth=4, interaction_groups=[[i, i] for i in range(4)],
                     window_sizes=[0] * 4),
                dict(conv, stage_dims=[64, 64, 128, 128])]
    torch.manual_seed(0)
    return piip.create_model("piip_ct_vs_cb_1024_672_448", img_size=128, branches=branches,
                             deform_num_heads=2, out_groups=[0, 1, 2]).eval()


@pytest.mark.heavy
@needs_onnx
def test_onnx_hybrid_convnext_vit(tmp_path):
    _exported(tiny_hybrid(), "onnx", tmp_path / "hybrid.onnx", (160, 192), (224, 160))


@pytest.mark.heavy
@needs_onnx
def test_onnx_classifier(tmp_path):
    model = tiny("piip_tsb_368_192_128_cls")
    r = _exported(model, "onnx", tmp_path / "cls.onnx", (96, 128), (160, 112))
    assert r.task == "classification" and r.outputs == [("logits", "batch x 1000")]


def tiny_segmentor():
    from piip.tasks.segmentation import SegmentorConfig, build_segmentor
    return build_segmentor(tiny("piip_tsb_896_448_336_seg"), 3, SegmentorConfig(num_classes=3, channels=32,
                                                                                aux_channels=None)).eval()


@pytest.mark.heavy
def test_segmentor_pt2_dynamic(tmp_path):
    r = _exported(tiny_segmentor(), "pt2", tmp_path / "seg.pt2", (96, 128), (128, 96))
    assert r.task == "segmentation" and r.outputs == [("logits", "batch x 3 x H x W")]


@pytest.mark.heavy
@needs_onnx
def test_segmentor_onnx_dynamic(tmp_path):
    """UperNet's pyramid pooling (bins 1/2/3/6 of a map whose size changes) follows the size in ONNX
    (the exporter's own adaptive_avg_pool2d kept the example's kernel: 5.7e-2 relative off at
    112x160); the backbone's deformable attention is GridSample nodes (this also covers the ONNX
    backbone: a bare backbone exports through the same path, its outputs are checked as .pt2)."""
    import onnx
    r = _exported(tiny_segmentor(), "onnx", tmp_path / "seg.onnx", (96, 128), (192, 224))
    print("segmentor onnx", r.checks)
    assert r.task == "segmentation" and r.outputs == [("logits", "batch x 3 x H x W")]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "seg.onnx")).graph.node}
    assert "GridSample" in ops and "Loop" not in ops   # the deformable op as one standard node


def test_torchscript_tracing_is_refused():
    """jit.trace (and the legacy ONNX exporter built on it) would freeze one size: refused in one line."""
    model = tiny("piip_tsb_1568_1120_672")
    with pytest.raises(ValueError, match="torch.export.export"):
        torch.jit.trace(model, torch.rand(1, 3, 64, 64), strict=False)


# ------------------------------------------------------------------ CLI
TINY_ARGS = ["--model", "piip_tsb_1568_1120_672", "--img-size", "64", "--override",
             '{"branches": {"embed_dim": 32, "num_heads": 2, "depth": 1, "interaction_groups": [[0, 0]], '
             '"window_sizes": [0]}, "deform_num_heads": 2}']


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_bad_inputs(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "m.pt2")
    assert main(["export", *TINY_ARGS, "--format", "pt2", "--out", out, "--example-size", "100"]) == 2
    assert "multiples of 16" in _err(capsys)
    assert main(["export", *TINY_ARGS, "--format", "tflite", "--out", out]) == 2
    assert "tflite" in _err(capsys)
    assert main(["export", *TINY_ARGS, "--format", "pt2", "--out", str(tmp_path / "no" / "m.pt2")]) == 2
    assert "does not exist" in _err(capsys)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # import fails as when not installed
    assert main(["export", *TINY_ARGS, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'piip[export]'" in _err(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.heavy
def test_cli_export_pt2(tmp_path, capsys):
    out = tmp_path / "tsb.pt2"
    assert main(["export", *TINY_ARGS, "--format", "pt2", "--out", str(out), "--example-size", "96", "128"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "images (batch x 3 x H x W)" in text and "checked against eager" in text
    assert [p.name for p in tmp_path.iterdir()] == ["tsb.pt2"]     # no temporary left behind
