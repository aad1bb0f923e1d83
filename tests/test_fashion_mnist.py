"""Fashion-MNIST evidence data (IDX reader, scenes in COCO format) and the timm export of pretrained
branches; fast: IDX files are made here, the Debian package is not needed."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from piip.data import fashion_mnist as fm


def _write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + body)


def _fake_release(root, n: int = 40, seed: int = 0) -> None:
    """A tiny Fashion-MNIST folder: garment-like blobs (bright rectangles on black), 10 classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        h, w = rng.integers(10, 26, size=2)
        y, x = (28 - h) // 2, (28 - w) // 2
        imgs[i, y:y + h, x:x + w] = rng.integers(60, 255)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for split, (img_name, lab_name) in fm._FILES.items():
        _write_idx(root / (img_name + ".gz"), imgs, gz=True)
        _write_idx(root / lab_name, labels)


def test_idx_reader_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 5
    _write_idx(tmp_path / "a.idx", a)
    _write_idx(tmp_path / "b.idx.gz", a.astype(np.uint8), gz=True)
    assert np.array_equal(fm.read_idx(str(tmp_path / "a.idx")), a)
    assert np.array_equal(fm.read_idx(str(tmp_path / "b.idx.gz")), a.astype(np.uint8))
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.read_idx(str(tmp_path / "bad.idx"))
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="IDX header says shape"):
        fm.read_idx(str(tmp_path / "short.idx"))


def test_missing_package_message(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV_ROOT, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("train", str(tmp_path))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fm.load_fashion_mnist("val", str(tmp_path))


def test_loader_and_image_folder(tmp_path, monkeypatch):
    _fake_release(tmp_path)
    monkeypatch.setenv(fm.ENV_ROOT, str(tmp_path))
    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8 and y.tolist()[:3] == [0, 1, 2]
    root = fm.write_image_folder(str(tmp_path / "cls"), x, y, per_class=2)
    from piip.data.classification import ImageClassification
    ds = ImageClassification(root)
    assert ds.num_classes == 10 and len(ds) == 20 and sorted(ds.class_names) == sorted(fm.CLASSES)


def _scenes(tmp_path, name, seed, background=None, monkeypatch=None):
    if not (tmp_path / "rel").exists():
        _fake_release(tmp_path / "rel")
    x, y = fm.load_fashion_mnist("train", str(tmp_path / "rel"))
    if background is not None:
        monkeypatch.setattr(fm, "_background", background)
    return fm.make_scenes(str(tmp_path / name), "train", x, y, 3, size=96, objects=(3, 6), scale=(10, 40),
                          large=(0.3, 50, 80), seed=seed)


def test_scenes_deterministic_for_a_seed(tmp_path):
    a = json.load(open(_scenes(tmp_path, "a", 3)))
    b = json.load(open(_scenes(tmp_path, "b", 3)))
    c = json.load(open(_scenes(tmp_path, "c", 4)))
    assert a == b and a != c
    for i in range(1, 4):
        assert (tmp_path / "a" / "train" / f"{i - 1:06d}.png").read_bytes() == \
            (tmp_path / "b" / "train" / f"{i - 1:06d}.png").read_bytes()


def test_scene_masks_and_boxes_are_the_pasted_pixels(tmp_path, monkeypatch):
    from PIL import Image
    from pycocotools.coco import COCO
    # a black canvas: every pixel a garment was pasted on is non-zero, so masks can be checked exactly
    path = _scenes(tmp_path, "s", 5, background=lambda size, rng: np.zeros((size, size, 3), np.float32),
                   monkeypatch=monkeypatch)
    coco = COCO(path)
    assert len(coco.anns) >= 3
    for img_id, info in coco.imgs.items():
        pixels = np.asarray(Image.open(tmp_path / "s" / "train" / info["file_name"])).any(axis=2)
        masks = [coco.annToMask(a).astype(bool) for a in coco.imgToAnns[img_id]]
        union = np.zeros_like(pixels)
        for m, a in zip(masks, coco.imgToAnns[img_id]):
            assert not (union & m).any(), "visible masks overlap"
            union |= m
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == m.sum() and 1 <= a["category_id"] <= 10
        assert np.array_equal(union, pixels)


def test_scenes_coco_json_scores_itself_perfectly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    path = _scenes(tmp_path, "e", 6)
    gt = COCO(path)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt.anns.values()]
    for iou in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(dets), iou)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


def test_timm_export_roundtrip(tmp_path):
    """A single-branch classifier -> timm file: same logits in timm, same tokens as a PIIP branch."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from piip.cli import main
    from piip.registry import create_model
    from piip.tasks.classification_train import classifier_config_dict
    from piip.weights.timm_export import timm_model_kwargs
    over = {"img_size": 32, "num_classes": 10, "branches": {"embed_dim": 24, "num_heads": 2, "depth": 2,
                                                              "pos_grid": 2, "layer_scale": 0.5}}
    model = create_model("deit_b_224_cls", **over).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    ck = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "model_config": classifier_config_dict(model),
                "class_names": fm.CLASSES}, ck)
    out = tmp_path / "vit.safetensors"
    assert main(["convert", "timm", str(ck), "--out", str(out)]) == 0
    ref = timm.models.vision_transformer.VisionTransformer(**timm_model_kwargs(model.backbone.branches[0], 10))
    ref.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), model(x), rtol=0, atol=1e-5)
        # read back through pretrained_branches into a fresh classifier: the same network
        again = create_model("deit_b_224_cls", pretrained_branches=[str(out)], **over).eval()
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-5)
    assert main(["convert", "timm", str(ck), "--out", str(tmp_path / "x.pt")]) == 2
