"""Detection: tiny PIIP Mask R-CNN / Faster R-CNN / RetinaNet on a synthetic COCO-format set."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from piip.commands._model_args import parse_overrides
from piip.data import CocoDetection, detection_collate, detection_train_transforms
from conftest import made_coco
from piip.engine import TrainConfig, Trainer, WarmupSchedule, build_optimizer, param_groups
from piip.evaluation import COCO_METRIC_NAMES, evaluate_detector
from piip.tasks.detection import DetectorConfig, build_detector

# 96 px: the coarsest branch (0.4x) still gets a 2x2 grid, which GroupNorm(32) over 32 channels needs
TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
TINY_ARGS = ["--img-size", "96", "--override", "branches.embed_dim=32", "--override", "branches.num_heads=2",
             "--override", '{"branches": {"depth": 1}, "deform_num_heads": 2}']
HEADS = DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32, rpn_batch_size=64, roi_batch_size=64)


def tiny_detector(kind: str = "mask_rcnn", seed: int = 0):
    torch.manual_seed(seed)
    return build_detector("piip_tsb_1120_896_448", 3, kind, HEADS, **TINY)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """6 shape images + one image with no annotations + one corrupt file + a crowd and a degenerate box."""
    root, ann, d = made_coco(tmp_path_factory, "coco", num_images=6, image_size=(64, 56), max_objects=3,
                             min_object=6, seed=0)
    with open(os.path.join(root, "train", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really an image")
    from PIL import Image
    Image.new("RGB", (56, 64), (40, 40, 40)).save(os.path.join(root, "train", "empty.png"))
    d["images"] += [{"id": 100, "file_name": "broken.png", "height": 64, "width": 56},
                    {"id": 101, "file_name": "empty.png", "height": 64, "width": 56}]
    n = len(d["annotations"])
    d["annotations"] += [
        {"id": n + 1, "image_id": 100, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0,
         "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]},
        {"id": n + 2, "image_id": 1, "category_id": 2, "bbox": [1, 1, 30, 30], "area": 900, "iscrowd": 1,
         "segmentation": [[1, 1, 31, 1, 31, 31, 1, 31]]},
        {"id": n + 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0,
         "segmentation": [[5, 5, 5.5, 5, 5.5, 15, 5, 15]]}]
    with open(ann, "w") as f:
        json.dump(d, f)
    return {"root": root, "ann": ann, "images": os.path.join(root, "train")}


def train_set(coco, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(coco["ann"], coco["images"], detection_train_transforms(57, 96), skip_empty=True, **kw)


def test_dataset_cleans_annotations_and_survives_bad_files(coco):
    with pytest.warns(UserWarning, match="skipping 1 of 8 images"):
        ds = CocoDetection(coco["ann"], coco["images"], skip_empty=True)
    assert 101 not in ds.ids and 100 in ds.ids
    img, t = ds[0]
    assert img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    assert t["masks"].shape[1:] == img.shape[1:] and len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
    assert t["labels"].min() >= 1 and t["labels"].max() <= 3
    # crowd (image 1) and sub-pixel (image 2) boxes are dropped
    assert all(a["iscrowd"] == 0 and a["bbox"][2] >= 1 for i in (1, 2) for a in ds._valid_anns(i))
    # the corrupt image is reported and replaced (training) or returned as None (evaluation)
    bad = ds.ids.index(100)
    with pytest.warns(UserWarning, match="unreadable image 'broken.png'"):
        img, t = ds[bad]
    assert t["image_id"] != 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = CocoDetection(coco["ann"], coco["images"], on_error="none")
        assert ev[ev.ids.index(100)] is None and len(ev) == 8


def test_training_steps_lower_the_loss(coco):
    ds = train_set(coco)
    batch = detection_collate([ds[i] for i in range(2)])
    model = tiny_detector().train()
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.0, layer_decay=0.85)
    losses = []
    for _ in range(6):
        loss = sum(model(*batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["faster_rcnn", "retinanet"])
def test_other_detectors_run_a_step(coco, kind):
    ds = train_set(coco, with_masks=False)
    model = tiny_detector(kind).train()
    images, targets = detection_collate([ds[0], ds[1]])
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.branches[0].blocks[0].attn.qkv.weight.grad is not None
    out = model.eval()([images[0]])[0]
    assert set(out) == {"boxes", "labels", "scores"}


def test_detector_structure_and_transform():
    model = tiny_detector()
    assert set(dict(model.named_children())) >= {"backbone", "rpn", "roi_heads", "transform"}
    assert set(dict(model.backbone.named_children())) == {"body", "fpn"}
    tr = model.transform
    assert (tr.min_size, tr.max_size, tr.size_divisible) == ((96,), 96, 32)
    assert tr.image_mean == [0.5] * 3 and tr.image_std == [0.5] * 3
    images, _ = tr([torch.full((3, 40, 30), 1.0)])
    assert images.image_sizes == [(96, 72)]                  # long side = finest resolution, keep ratio
    assert images.tensors.shape[-2:] == (96, 96)             # padded to multiples of 32
    official = build_detector(model.backbone.body, num_classes=3, det_cfg=DetectorConfig(min_size=96 * 800 // 1333))
    images, _ = official.transform([torch.full((3, 40, 30), 1.0)])
    assert images.image_sizes == [(76, 57)]                  # released protocol: min(96/40, 57/30)
    assert torch.allclose(images.tensors[0, :, :76, :57], torch.ones(()))  # (1 - .5) / .5
    # S=1120: long side 1120 (released protocol: short side capped at 672), pad 224; ViTDet -> pad 64
    from piip.registry import get_config
    from piip.tasks.detection import resolve_sizes
    assert resolve_sizes(get_config("piip_tsb_1120_896_448"), DetectorConfig()) == (1120, 1120, 224)
    assert resolve_sizes(get_config("piip_tsb_1120_896_448"), DetectorConfig(min_size=672)) == (672, 1120, 224)
    assert resolve_sizes(get_config("vitdet_b_1024"), DetectorConfig())[2] == 64


def test_layer_decay_and_schedule():
    model = tiny_detector()
    groups = {n: g["lr_scale"] for g in param_groups(model, 1.0, 0.05, 0.85) for n in g["param_names"]}
    body = "backbone.body.branches"
    L = 1 + 2  # depth 1
    assert groups[f"{body}.2.blocks.0.attn.qkv.weight"] == pytest.approx(0.85 ** (L - 2))  # largest branch
    assert groups[f"{body}.0.patch_embed.proj.weight"] == pytest.approx(0.85 ** (L - 1))
    assert groups["backbone.fpn.inner_blocks.0.0.weight"] == 1.0
    assert groups["roi_heads.box_predictor.cls_score.weight"] == 1.0
    wd = {n: g["weight_decay"] for g in param_groups(model, 1.0, 0.05, 0.85) for n in g["param_names"]}
    assert wd[f"{body}.0.blocks.0.norm1.weight"] == 0 and wd[f"{body}.0.blocks.0.mlp.fc1.weight"] == 0.05
    s = WarmupSchedule(120, warmup_iters=10, warmup_ratio=0.001, milestones=[80, 110])
    assert s(0) == pytest.approx(0.001) and s(10) == 1.0 and s(80) == pytest.approx(0.1) and s(115) == pytest.approx(0.01)


def _trainer(coco, out, **kw):
    cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=4, lr=1e-3, warmup_iters=2, lr_steps=[1],
                      workers=0, layer_decay=0.85, log_every=100, **kw)
    from piip.tasks.detection import detection_forward
    return Trainer(tiny_detector(seed=1), train_set(coco), cfg, detection_forward, detection_collate)


def test_resume_continues_exactly(coco, tmp_path):
    full = _trainer(coco, tmp_path / "a")
    full.fit()
    assert full.step == 2 * full.iters_per_epoch == 4
    part = _trainer(coco, tmp_path / "b", max_steps=3)   # "interrupted" mid-epoch 2
    part.fit()
    saved = torch.load(part.checkpoint_path, weights_only=False)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 1, 3)
    resumed = _trainer(coco, tmp_path / "b")
    resumed.resume(part.checkpoint_path)
    assert resumed.step == 3
    for a, b in zip(resumed.optimizer.state.values(), part.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed.scheduler.get_last_lr() == part.scheduler.get_last_lr()
    resumed.fit()
    assert resumed.step == 4
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_cli_train_eval_predict(coco, tmp_path, capsys):
    from piip.cli import main
    out = tmp_path / "run"
    common = ["--fpn-channels", "32", "--box-head-dim", "64", "--mask-head-dim", "32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "detection", "--train-ann", coco["ann"], "--train-images", coco["images"],
                   "--epochs", "1", "--batch-size", "4", "--workers", "0", "--warmup-iters", "1",
                   "--output-dir", str(out), "--eval-every", "0", *TINY_ARGS, *common])
        assert rc == 0
        ckpt = out / "checkpoint.pt"
        assert ckpt.exists() and not list(out.glob("*.tmp*"))
        rc = main(["eval", "detection", "--checkpoint", str(ckpt), "--val-ann", coco["ann"],
                   "--val-images", coco["images"], "--workers", "0", "--out-dir", str(out / "eval")])
    assert rc == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for t in ("bbox", "segm"):
        assert list(metrics[t]) == COCO_METRIC_NAMES
        assert all(-1 <= v <= 1 for v in metrics[t].values())
    assert metrics["unreadable_images"] == 1
    png = tmp_path / "pred.png"
    rc = main(["predict", os.path.join(coco["images"], "000000.png"), "--checkpoint", str(ckpt),
               "--out", str(png), "--score-thresh", "0.0"])
    assert rc == 0
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (56, 64) and im.mode == "RGB"


def test_evaluate_returns_coco_metrics(coco):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(coco["ann"], coco["images"], on_error="none")
        m = evaluate_detector(tiny_detector("faster_rcnn"), ds, verbose=False)
    assert set(m) == {"bbox"} and list(m["bbox"]) == COCO_METRIC_NAMES


def test_parse_overrides():
    assert parse_overrides(["branches.embed_dim=32", '{"branches": {"depth": 2}}', "merge=linear"], 64) == \
        {"branches": {"embed_dim": 32, "depth": 2}, "merge": "linear", "img_size": 64}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["oops"])
    with pytest.raises(ValueError, match="kind must be one of"):
        build_detector("piip_tsb_1120_896_448", 3, "yolo", **TINY)


def test_cli_trains_a_convnext_vit_hybrid_with_its_recipe(coco, tmp_path):
    """A registered hybrid (ConvNeXt-T / ViT-S / ConvNeXt-B, shrunk) trains one step in the CLI with
    the released recipe: lr 2e-4, layer decay 0.8 on the ViT blocks only."""
    from piip.cli import main
    out = tmp_path / "hybrid"
    tiny = {"branches": [{"stage_dims": [32, 32, 64, 64]}, {"embed_dim": 64, "num_heads": 2},
                         {"stage_dims": [32, 32, 64, 64]}], "deform_num_heads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "detection", "--model", "piip_ct_vs_cb_1024_672_448", "--img-size", "128",
                   "--override", json.dumps(tiny), "--train-ann", coco["ann"], "--train-images", coco["images"],
                   "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-iters", "1", "--max-steps", "1",
                   "--output-dir", str(out), "--eval-every", "0", "--fpn-channels", "32", "--box-head-dim", "64",
                   "--mask-head-dim", "32"])
    assert rc == 0
    groups = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["optimizer"]["param_groups"]
    scales = sorted({round(g["lr_scale"], 8) for g in groups})
    assert scales[0] == round(0.8 ** 13, 8) and scales[-1] == 1.0   # ViT patch embedding ... heads
    assert all(g["initial_lr"] == pytest.approx(2e-4 * g["lr_scale"]) for g in groups)
