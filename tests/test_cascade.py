"""Cascade Mask R-CNN on a tiny PIIP backbone: stage set-up, losses, score averaging, training, CLI."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import detector_step_losses
from piip.data import CocoDetection, detection_collate, detection_train_transforms
from piip.data.synthetic import make_coco
from piip.tasks.detection import DetectorConfig, build_detector

TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
TINY_ARGS = ["--img-size", "96", "--override", "branches.embed_dim=32", "--override", "branches.num_heads=2",
             "--override", '{"branches": {"depth": 1}, "deform_num_heads": 2}']
HEADS = DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32, rpn_batch_size=64, roi_batch_size=64)


def tiny_cascade(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector("piip_tsb_1120_896_448", 3, "cascade_mask_rcnn", HEADS, **TINY)


def hand_made(images):
    targets = []
    for boxes, labels, im in zip(([[5.0, 5, 30, 40], [10, 20, 50, 60]], [[0.0, 0, 20, 20]]), ([1, 3], [2]), images):
        b = torch.tensor(boxes)
        masks = torch.zeros(len(b), *im.shape[-2:], dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(b.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": b, "labels": torch.tensor(labels), "masks": masks})
    return targets


def test_stages_as_mmdet_cascade():
    heads = tiny_cascade().roi_heads
    assert len(heads.box_head) == len(heads.box_predictor) == 3
    assert [m.high_threshold for m in heads.matchers] == [0.5, 0.6, 0.7]
    assert [m.low_threshold for m in heads.matchers] == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert heads.stage_weights == (1.0, 0.5, 0.25)
    assert all(p.bbox_pred.out_features == 4 and p.cls_score.out_features == 4 for p in heads.box_predictor)


def test_losses_on_hand_made_targets_and_eval_outputs():
    model = tiny_cascade().train()
    images = [torch.rand(3, 64, 56), torch.rand(3, 50, 70)]
    losses = model(images, hand_made(images))
    stages = {f"s{i}_loss_{n}" for i in range(3) for n in ("classifier", "box_reg")}
    assert set(losses) == stages | {"loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for i in range(3):
        assert model.roi_heads.box_predictor[i].bbox_pred.weight.grad.abs().sum() > 0
        assert model.roi_heads.box_head[i].fc6.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 50, 70, dtype=torch.uint8)}
    assert all(torch.isfinite(v) for v in model(images, [hand_made(images)[0], empty]).values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, im in zip(out, images):
        h, w = im.shape[-2:]
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        assert o["masks"].shape[1:] == (1, h, w) and len(o["masks"]) == len(o["boxes"]) > 0
        assert (o["boxes"][:, 2] <= w).all() and (o["boxes"][:, 3] <= h).all() and (o["boxes"] >= 0).all()


def test_test_scores_average_the_stages_logits():
    """Stages with constant logits (zero weights) and no box deltas: every detection's score is the
    softmax of the mean of the three stages' logits."""
    model = tiny_cascade().eval()
    biases = torch.tensor([[0.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 0.0], [0.0, 0.5, 0.5, 4.0]])
    with torch.no_grad():
        for p, b in zip(model.roi_heads.box_predictor, biases):
            p.cls_score.weight.zero_()
            p.cls_score.bias.copy_(b)
            p.bbox_pred.weight.zero_()
            p.bbox_pred.bias.zero_()
        out = model([torch.rand(3, 64, 56)])[0]
    expect = biases.mean(0).softmax(0)
    assert len(out["scores"]) > 0
    torch.testing.assert_close(out["scores"], expect[out["labels"]], atol=1e-6, rtol=1e-6)
    # no stage alone gives these scores
    assert all(not torch.allclose(b.softmax(0)[out["labels"]], out["scores"]) for b in biases)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    ann = make_coco(root, num_images=4, image_size=(64, 56), max_objects=3, min_object=8, seed=0)
    return {"ann": ann, "images": f"{root}/train"}


def test_training_steps_lower_the_loss(coco):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(coco["ann"], coco["images"], detection_train_transforms(96, 96), skip_empty=True)
    batch = detection_collate([ds[i] for i in range(2)])
    losses = detector_step_losses(tiny_cascade().train(), batch, 6, 2e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def test_cli_train_and_eval_cascade(coco, tmp_path):
    from piip.cli import main
    out = tmp_path / "run"
    common = ["--fpn-channels", "32", "--box-head-dim", "64", "--mask-head-dim", "32", "--roi-batch-size", "64"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "detection", "--kind", "cascade_mask_rcnn", "--train-ann", coco["ann"],
                   "--train-images", coco["images"], "--epochs", "1", "--batch-size", "2", "--workers", "0",
                   "--warmup-iters", "1", "--output-dir", str(out), "--eval-every", "0", "--aug", "ms",
                   *TINY_ARGS, *common])
        assert rc == 0
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert ckpt["model_config"]["detector"]["aug"] == "ms" and ckpt["train_config"]["clip_grad"] is None
        assert (ckpt["train_config"]["epochs"], ckpt["train_config"]["lr_steps"]) == (1, [8, 11])
        rc = main(["eval", "detection", "--checkpoint", str(out / "checkpoint.pt"), "--val-ann", coco["ann"],
                   "--val-images", coco["images"], "--workers", "0", "--out-dir", str(out / "eval")])
    assert rc == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"}
    assert all(-1 <= v <= 1 for t in ("bbox", "segm") for v in metrics[t].values())
