"""Detector export: torch.export (.pt2) and ONNX (onnxruntime) of tiny PIIP detectors, checked
against eager at two image sizes other than the export example (one resized by the detector's
transform, one not), plus the pieces that make torchvision's inference exportable."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from piip.tasks.detection import DetectorConfig, build_detector, paste_masks, resize_keep_ratio
from piip.tasks.detection_export import check_detector_export, export_detector, export_program

TINY = dict(branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
HEADS = DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32, detections_per_img=20,
                       num_queries=12, transformer_dim=32, transformer_heads=2, transformer_ffn=64,
                       enc_layers=1, dec_layers=2, dn_queries=6)
MODELS = {"dino": "piip_sbl_1792_1120_672_dino"}
QUICK_KINDS = ("faster_rcnn",)      # the kinds the default run exports (every kind: PIIP_EXPORT_ALL=1)
# the smallest resolution whose coarsest maps are >= 2 px (stride 64; RetinaNet's P7: 128)
IMG = {"retinanet": 256}
# RetinaNet (256 px): torch.export specialises counts that are 2 at the example against 1, so its
# check sizes keep every side > 224 px after the resize: two 14-token attention windows, as at the
# example (a 192-px side has one: `Guard failed: (13 + 4 * ((63 + ...) // 64)) // 14 != 1`), and
# padding to 16 instead of the multi-branch default 224 keeps them unpadded (240 px)
PAD = {"retinanet": 16}
OTHERS = {"retinanet": [(512, 480), (240, 256)],
          # + one padded size (resized to 128x115, padded to 128x128): ONNX's truncating Div once made
          # the transform's ceil-to-the-pad-divisor a floor (a crop)
          "faster_rcnn": [(256, 192), (96, 128), (100, 90)]}
# class-logit gains (by parameter name) that spread the random scores out
GAINS = {"rpn.head.cls_logits": 1000.0, "classification_head.cls_logits": 3000.0, "cls_score": 4.0,
         "cls_branches": 1.0}


def sizes(kind: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(export example, two other sizes): S x S, then 2S x 1.5S (resized to S x 0.75S) and
    0.75S x S (kept as is), S = the model's resolution (OTHERS: per kind). Mostly unpadded: anchors
    over zero padding can score exactly alike, and onnxruntime's TopK breaks such ties its own way."""
    s = IMG.get(kind, 128)
    return (s, s), OTHERS.get(kind, [(2 * s, s * 3 // 2), (s * 3 // 4, s)])


def sharpened(kind: str, seed: int = 0):
    """A tiny random detector whose class logits are spread out (weights x GAINS, no low prior bias),
    so that scores have no near-ties: float-rounding differences between runtimes then cannot
    reorder the detections."""
    torch.manual_seed(seed)
    heads = dataclasses.replace(HEADS, pad_divisor=PAD.get(kind))
    model = build_detector(MODELS.get(kind, "piip_tsb_1120_896_448"), 3, kind, heads,
                           img_size=IMG.get(kind, 128), **TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = next((g for k, g in GAINS.items() if k in name), None)
            if gain is not None:
                p.mul_(gain) if name.endswith("weight") else p.zero_()
    return model


def test_resize_and_paste_match_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.models.detection.transform import _resize_image_and_masks
    for size in [(96, 128), (70, 50), (64, 96)]:
        image = torch.rand(3, *size)
        assert torch.equal(resize_keep_ratio(image, 64, 128), _resize_image_and_masks(image, 64, 128)[0])
    torch.manual_seed(0)
    xy = torch.rand(30, 2) * 80
    boxes = torch.cat([xy, xy + torch.rand(30, 2) * 50 + 0.2], 1)
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, 90), boxes[:, 1::2].clamp(0, 100)
    masks = torch.rand(30, 1, 28, 28)
    ours = paste_masks(masks, boxes, 100, 90)
    assert ours.shape == (30, 1, 100, 90)
    assert (ours - paste_masks_in_image(masks, boxes, (100, 90))).abs().max() < 1e-5
    assert paste_masks(masks[:0], boxes[:0], 100, 90).shape == (0, 1, 100, 90)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn", "retinanet", "cascade_mask_rcnn", "dino"])
def test_export_pt2_and_onnx_at_other_sizes(kind, tmp_path):
    if kind not in QUICK_KINDS and not os.environ.get("PIIP_EXPORT_ALL"):
        pytest.skip("1-3 min a detector kind on 2 CPU cores; PIIP_EXPORT_ALL=1 runs every kind")
    model = sharpened(kind)
    example, others = sizes(kind)
    with torch.no_grad():
        counts = [len(model([torch.rand(3, *s)])[0]["boxes"]) for s in others]
    assert all(c > 0 for c in counts), counts            # the comparison compares detections
    program = export_program(model, example)
    formats = ["pt2"]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        formats.append("onnx")
    except ImportError:
        pass
    for fmt in formats:
        path = str(tmp_path / f"{kind}.{fmt}")
        info = export_detector(model, fmt, path, example, program=program)
        assert info["outputs"][:3] == ["boxes", "labels", "scores"]
        assert ("masks" in info["outputs"]) == (kind in ("mask_rcnn", "cascade_mask_rcnn"))
        diffs = check_detector_export(model, path, fmt, others)
        print(kind, fmt, diffs)
        for d in diffs.values():
            assert d["boxes"] <= 1e-3 and d["labels"] == 0 and d["scores"] <= 1e-4
            if "masks" in d:
                assert d["masks"] <= 1e-3
    if "onnx" not in formats:
        pytest.skip("ONNX half skipped: needs the optional packages onnxscript and onnxruntime (piip[export])")


def test_bad_export_arguments(tmp_path):
    model = sharpened("faster_rcnn")
    with pytest.raises(ValueError, match="unknown export format"):
        export_detector(model, "tflite", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="does not exist"):
        export_detector(model, "pt2", str(tmp_path / "missing" / "m.pt2"))
    with pytest.raises(ValueError, match="outside"):
        export_program(model, (8, 96))
    small = build_detector("piip_tsb_1120_896_448", 3, "faster_rcnn", HEADS, img_size=96, **TINY)
    with pytest.raises(ValueError, match="stride-64 maps are 1 px"):
        export_program(small)               # 96 x 96: the stride-64 level is one pixel



def test_detectors_are_in_the_export_task_table():
    from piip.export.tasks import find_task
    model = build_detector("piip_tsb_1120_896_448", 3, "mask_rcnn", HEADS, img_size=128, **TINY)
    task = find_task(model)
    assert task.name == "detection" and task.input_names == ["image"]
    assert task.output_names(model) == ["boxes", "labels", "scores", "masks"]
    assert task.backbone(model) is model.backbone.body
    (image,) = task.inputs(model, 2, (96, 128))
    assert image.shape == (3, 96, 128)
