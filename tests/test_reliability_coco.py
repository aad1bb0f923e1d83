"""Box-only and mixed COCO files: `segmentation` missing, [], polygons, RLE (compressed and not), crowd.
Box detectors train and evaluate on them; mask detectors evaluate box AP everywhere and mask AP where
masks exist; Mask R-CNN on a file without masks is refused in one line; instances without a mask in a
mask file are left out of mask training (mmdet 3.x's rule)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools", reason="COCO data needs the 'detection' extra (pycocotools)")
from pycocotools import mask as mask_utils  # noqa: E402

from piip.cli import main  # noqa: E402
from piip.data import CocoDetection  # noqa: E402
from conftest import made_coco  # noqa: E402
from piip.evaluation import evaluate_detector  # noqa: E402
from piip.tasks.detection import DetectorConfig, build_detector  # noqa: E402

TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
TINY_ARGS = ["--img-size", "96", "--override", '{"branches": {"embed_dim": 32, "num_heads": 2, "depth": 1}, '
             '"deform_num_heads": 2}', "--fpn-channels", "32", "--box-head-dim", "64", "--mask-head-dim", "32"]
DINO_ARGS = ["--model", "piip_sbl_1792_1120_672_dino", "--num-queries", "12", "--transformer-dim", "32",
             "--transformer-heads", "2", "--transformer-ffn", "64", "--enc-layers", "1", "--dec-layers", "1",
             "--dn-queries", "4"]


def _rle(poly: list, h: int, w: int, compressed: bool) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    m = mask_utils.decode(rle).flatten(order="F")     # uncompressed: run lengths starting with zeros
    runs, cur, n = [], 0, 0
    for v in m:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [h, w], "counts": runs}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, _, d = made_coco(tmp_path_factory, "coco_rel", num_images=4, image_size=(64, 56), max_objects=3,
                           min_object=8, seed=1)
    anns = d["annotations"]
    assert len(anns) >= 6
    # mixed: polygons, compressed RLE, uncompressed RLE, [], missing, a 2-point polygon, and a crowd RLE
    mixed = json.loads(json.dumps(d))
    m = mixed["annotations"]
    h, w = 64, 56
    m[0]["segmentation"] = _rle(m[0]["segmentation"][0], h, w, compressed=True)
    m[1]["segmentation"] = _rle(m[1]["segmentation"][0], h, w, compressed=False)
    m[2]["segmentation"] = []
    del m[3]["segmentation"]
    m[4]["segmentation"] = [[1, 1, 5, 5]]                        # fewer than 3 points: no mask
    crowd = {**d["annotations"][5], "id": 999, "iscrowd": 1,
             "segmentation": _rle(d["annotations"][5]["segmentation"][0], h, w, compressed=True)}
    m.append(crowd)
    # box-only: no segmentation anywhere (missing or []), some without area / iscrowd, one crowd box
    box = json.loads(json.dumps(d))
    for i, a in enumerate(box["annotations"]):
        if i % 2:
            a["segmentation"] = []
        else:
            del a["segmentation"], a["area"], a["iscrowd"]
    box["annotations"].append({"id": 999, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1})
    out = {}
    for name, data in (("mixed", mixed), ("box", box)):
        out[name] = os.path.join(root, f"{name}.json")
        with open(out[name], "w") as f:
            json.dump(data, f)
    return {"root": root, "images": os.path.join(root, "train"), "orig": d, **out}


def test_mixed_file_masks_follow_mmdet(files):
    with pytest.warns(UserWarning, match=r"3 of \d+ annotations have no mask"):
        ds = CocoDetection(files["mixed"], files["images"], skip_empty=True)
    assert ds.without_mask == 3
    orig = {a["id"]: a for a in files["orig"]["annotations"]}
    seen = 0
    for i in range(len(ds)):
        _, t = ds[i]
        img_id = t["image_id"]
        kept = [a for a in ds.coco.imgToAnns[img_id] if not a.get("iscrowd") and a["id"] in orig
                and a["id"] not in {orig_id(files, k) for k in (2, 3, 4)}]
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) == len(kept)
        for mask, a in zip(t["masks"], kept):      # RLE and polygons decode to the same pixels
            ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(orig[a["id"]]["segmentation"], 64, 56)))
            assert np.array_equal(mask.numpy(), ref)
            seen += 1
    assert seen == len(files["orig"]["annotations"]) - 3


def orig_id(files, k: int) -> int:
    return files["orig"]["annotations"][k]["id"]


def test_box_only_file(files):
    with pytest.raises(ValueError, match=r"box.json: none of its \d+ annotations has a mask .*--kind faster_rcnn"):
        CocoDetection(files["box"], files["images"], skip_empty=True)
    ds = CocoDetection(files["box"], files["images"], skip_empty=True, with_masks=False)
    _, t = ds[0]
    assert "masks" not in t and len(t["boxes"]) > 0


@pytest.mark.parametrize("which, expect", [("box", {"bbox"}), ("mixed", {"bbox", "segm"})])
def test_mask_rcnn_evaluates_box_ap_everywhere_and_mask_ap_where_masks_exist(files, which, expect, tmp_path):
    torch.manual_seed(0)
    heads = DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32)
    model = build_detector("piip_tsb_1120_896_448", 3, "mask_rcnn", heads, **TINY)
    ds = CocoDetection(files[which], files["images"], with_masks=False, on_error="none")
    metrics = evaluate_detector(model, ds, batch_size=2, verbose=False, out_dir=str(tmp_path))
    assert set(metrics) == expect
    written = json.loads((tmp_path / "metrics.json").read_text())
    if which == "mixed":     # images with a mask-less annotation are left out of mask AP only
        bad = {a["image_id"] for a in json.load(open(files["mixed"]))["annotations"]
               if not a.get("segmentation") or a["segmentation"] == [[1, 1, 5, 5]]}
        assert written["segm_images"] == len(ds.ids) - len(bad) > 0


def _train(files, which, out, *extra) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", "detection", "--train-ann", files[which], "--train-images", files["images"],
                     "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-iters", "1", "--max-steps", "1",
                     "--output-dir", str(out), *TINY_ARGS, *extra])


@pytest.mark.parametrize("kind", ["faster_rcnn", "retinanet", "dino"])
def test_box_detectors_train_and_evaluate_on_a_box_only_file(files, tmp_path, kind):
    out = tmp_path / kind
    rc = _train(files, "box", out, "--kind", kind, *(DINO_ARGS if kind == "dino" else []))
    assert rc == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "detection", "--checkpoint", str(out / "checkpoint.pt"), "--val-ann", files["box"],
                     "--val-images", files["images"], "--workers", "0", "--out-dir", str(out / "eval")]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "bbox" in metrics and "segm" not in metrics


def test_mask_rcnn_trains_on_mixed_and_refuses_box_only(files, tmp_path, capsys):
    assert _train(files, "mixed", tmp_path / "mixed") == 0
    for kind in ("mask_rcnn", "cascade_mask_rcnn"):
        capsys.readouterr()
        assert _train(files, "box", tmp_path / kind, "--kind", kind) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "box.json: none of its" in err[0] and "--kind faster_rcnn" in err[0]
        assert not (tmp_path / kind).exists()
