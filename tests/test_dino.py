"""DINO on a tiny PIIP backbone: losses, eval outputs, matching, denoising masks, training, resume, CLI."""
from __future__ import annotations

import itertools
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
HEAD = DetectorConfig(num_queries=12, transformer_dim=32, transformer_heads=2, transformer_ffn=64, enc_layers=2,
                      dec_layers=2, dn_queries=6)
HEAD_ARGS = ["--num-queries", "12", "--transformer-dim", "32", "--transformer-heads", "2", "--transformer-ffn", "64",
             "--enc-layers", "2", "--dec-layers", "2", "--dn-queries", "6"]


def tiny_dino(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_detector("piip_sbl_1792_1120_672_dino", 3, "dino", HEAD, **{**TINY, **kw})


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    ann = make_coco(root, num_images=4, image_size=(64, 56), max_objects=3, min_object=8, seed=0)
    return {"root": root, "ann": ann, "images": f"{root}/train"}


def train_set(coco):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(coco["ann"], coco["images"], detection_train_transforms(96, 96), skip_empty=True,
                             with_masks=False)


HAND_MADE = [{"boxes": torch.tensor([[5.0, 5, 30, 40], [10, 20, 50, 60]]), "labels": torch.tensor([1, 3])},
             {"boxes": torch.tensor([[0.0, 0, 20, 20]]), "labels": torch.tensor([2])}]


def test_losses_on_hand_made_targets_and_eval_outputs():
    model = tiny_dino().train()
    assert set(dict(model.backbone.named_children())) == {"body", "neck"}
    images = [torch.rand(3, 64, 56), torch.rand(3, 50, 70)]
    losses = model(images, HAND_MADE)
    assert set(losses) == {f"{p}_{n}" for p in ("loss", "aux", "enc", "dn") for n in ("cls", "bbox", "giou")}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name in ("transformer.query_embed.weight", "dn.label_embedding.weight",
                 "transformer.decoder.0.cross_attn.sampling_offsets.weight",
                 "transformer.encoder.0.self_attn.sampling_offsets.weight",
                 "backbone.neck.extra_convs.0.0.weight", "backbone.body.branches.2.blocks.0.attn.qkv.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # an image without objects next to one with objects, and a batch without any
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert all(torch.isfinite(v) for v in model(images, [HAND_MADE[0], empty]).values())
    assert all(torch.isfinite(v) for v in model(images, [empty, empty]).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):          # mixed precision: box geometry stays float32
        seen = {}
        hook = model.transformer.decoder[0].cross_attn.register_forward_pre_hook(
            lambda m, args: seen.update(ref=args[1].dtype))
        amp_losses = model(images, HAND_MADE)
        hook.remove()
    assert seen["ref"] == torch.float32 and all(torch.isfinite(v) for v in amp_losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        assert set(o) == {"boxes", "labels", "scores"}
        assert len(o["boxes"]) == 12 * 3                       # top-k over queries x classes (k > Q*C here)
        h, w = im.shape[-2:]
        b = o["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-4).all() and (b[:, 3] <= h + 1e-4).all()
        assert (b[:, 2] >= b[:, 0]).all() and set(o["labels"].tolist()) <= {1, 2, 3}
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


def test_hungarian_matching_is_the_brute_force_optimum():
    from piip.tasks.dino.matcher import HungarianMatcher
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    for q, n in ((4, 3), (5, 5), (6, 2)):
        logits = torch.randn(q, 4, generator=g)
        boxes = torch.rand(q, 4, generator=g) * 0.5 + 0.1
        gt_boxes = torch.rand(n, 4, generator=g) * 0.5 + 0.1
        labels = torch.randint(0, 4, (n,), generator=g)
        scale = torch.tensor([64.0, 48.0, 64.0, 48.0])       # GIoU on pixel boxes of a 64x48 image
        qi, gi = matcher(logits, boxes, labels, gt_boxes, scale)
        cost = matcher.cost(logits, boxes, labels, gt_boxes, scale)
        assert sorted(gi.tolist()) == list(range(n)) and len(set(qi.tolist())) == n
        best = min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n))
        assert float(cost[qi, gi].sum()) == pytest.approx(float(best), rel=1e-6)


def test_denoising_groups_cannot_see_each_other():
    """Mask layout, and in the decoder: changing one denoising group changes only that group."""
    from piip.tasks.dino.denoising import DenoisingMeta, denoising_attn_mask
    meta = DenoisingMeta(pad_size=12, groups=3, max_targets=2)
    m = denoising_attn_mask(meta, 5, torch.device("cpu"))
    group = torch.arange(12) // 4
    for i in range(12):
        for j in range(12):
            assert bool(m[i, j]) == bool(group[i] != group[j])
    assert m[12:, :12].all() and not m[:, 12:].any()

    model = tiny_dino().train()
    images = [torch.rand(3, 64, 56), torch.rand(3, 50, 70)]
    image_list, targets = model.transform(images, [dict(t) for t in HAND_MADE])
    labels, boxes = model.normalised_targets(targets, image_list.image_sizes)
    torch.manual_seed(0)
    content, anchors, meta = model.dn(labels, boxes)
    assert meta.max_targets == 2 and meta.groups == 3 and meta.pad_size == 12
    x = image_list.tensors
    mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    for i, (h, w) in enumerate(image_list.image_sizes):
        mask[i, h:] = True
        mask[i, :, w:] = True
    feats = model.backbone(x)
    from piip.tasks.dino.neck import sine_map_encoding
    masks = [torch.nn.functional.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
    pos = [sine_map_encoding(mm, 16) for mm in masks]
    attn = denoising_attn_mask(meta, 12, x.device)
    with torch.no_grad():
        a = model.transformer(feats, masks, pos, (content, anchors, attn))
        changed = content.clone()
        changed[:, 4:8] += 1.0                                # group 1 only
        b = model.transformer(feats, masks, pos, (changed, anchors, attn))
    diff = (a["logits"] - b["logits"]).abs().amax((0, 1, 3))  # per query
    assert diff[4:8].max() > 1e-4
    assert diff[:4].max() < 1e-6 and diff[8:].max() < 1e-6   # other groups and the matching queries


def test_training_steps_lower_the_loss(coco):
    ds = train_set(coco)
    batch = detection_collate([ds[i] for i in range(2)])
    losses = detector_step_losses(tiny_dino().train(), batch, 8, 1e-3, clip=0.1)
    assert losses[-1] < 0.85 * losses[0], losses


def test_resume_continues_exactly(coco, tmp_path):
    from piip.tasks.detection import detection_forward
    from piip.engine import TrainConfig, Trainer

    def trainer(out, **kw):
        cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=2, lr=1e-3, warmup_iters=1, lr_steps=[1],
                          workers=0, layer_decay=0.85, clip_grad=0.1, log_every=100, **kw)
        return Trainer(tiny_dino(seed=1), train_set(coco), cfg, detection_forward, detection_collate)

    full = trainer(tmp_path / "a")
    full.fit()
    part = trainer(tmp_path / "b", max_steps=3)
    part.fit()
    resumed = trainer(tmp_path / "b")
    resumed.resume(part.checkpoint_path)
    resumed.fit()
    assert resumed.step == full.step == 4
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_cli_train_eval_predict_dino(coco, tmp_path):
    from piip.cli import main
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "detection", "--model", "piip_sbl_1792_1120_672_dino", "--kind", "dino",
                   "--train-ann", coco["ann"], "--train-images", coco["images"], "--aug", "ms",
                   "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-iters", "1",
                   "--output-dir", str(out), "--eval-every", "0", *TINY_ARGS, *HEAD_ARGS])
        assert rc == 0
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        det = ckpt["model_config"]["detector"]
        assert det["kind"] == "dino" and det["aug"] == "ms" and det["transformer_dim"] == 32
        tc = ckpt["train_config"]
        assert (tc["clip_grad"], tc["lr"], tc["epochs"]) == (0.1, 2e-4, 1)   # DINO recipe; --epochs wins over 3x
        rc = main(["eval", "detection", "--checkpoint", str(out / "checkpoint.pt"), "--val-ann", coco["ann"],
                   "--val-images", coco["images"], "--workers", "0", "--out-dir", str(out / "eval")])
    assert rc == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"bbox"} and "segm" not in metrics
    assert all(-1 <= v <= 1 for v in metrics["bbox"].values())
    png = tmp_path / "pred.png"
    assert main(["predict", f"{coco['images']}/000000.png", "--checkpoint", str(out / "checkpoint.pt"),
                 "--out", str(png), "--score-thresh", "0.0"]) == 0
    assert png.exists()


def test_cli_kinds_are_the_builder_kinds():
    from piip.commands.detection import KIND_CHOICES
    from piip.tasks.detection import KINDS
    assert KIND_CHOICES == list(KINDS)
    with pytest.raises(ValueError, match="aug must be one of"):
        build_detector("piip_sbl_1792_1120_672_dino", 3, "dino", DetectorConfig(aug="huge"), **TINY)


def test_any_registered_backbone():
    """A Mask R-CNN backbone by name: DINO builds only the stride 8/16/32 maps it reads."""
    for name in ("piip_tsb_1120_896_448", "vitdet_b_1024"):
        model = build_detector(name, 3, "dino", HEAD, **TINY).eval()
        assert model.backbone.body.cfg.pyramid_levels == [1, 2, 3]
        with torch.no_grad():
            out = model([torch.rand(3, 64, 56)])[0]
        assert out["boxes"].shape == (36, 4)


def test_registered_recipe_is_the_released_config():
    from piip.registry import get_config
    from piip.zoo.recipes import SCHEDULES, head_recipe
    cfg = get_config("piip_sbl_1792_1120_672_dino")
    r = head_recipe("piip_sbl_1792_1120_672_dino", cfg, "dino")
    assert (r["lr"], r["layer_decay"], r["clip_grad"], r["aug"]) == (2e-4, 0.85, 0.1, "ms")
    assert SCHEDULES[r["schedule"]] == (36, [27, 33]) and (r["min_size"], r["max_size"]) == (1400, 2332)
    assert cfg.image_norm == "imagenet" and cfg.pyramid_levels == [1, 2, 3]
    full = DetectorConfig()
    assert (full.num_queries, full.transformer_dim, full.transformer_heads, full.transformer_points,
            full.transformer_ffn, full.enc_layers, full.dec_layers, full.dn_queries, full.dn_label_noise,
            full.dn_box_noise) == (900, 256, 8, 4, 2048, 6, 6, 100, 0.5, 1.0)
    assert head_recipe("piip_tsb_1120_896_448", get_config("piip_tsb_1120_896_448"), "dino")["clip_grad"] == 0.1
    assert head_recipe("piip_tsb_1120_896_448", get_config("piip_tsb_1120_896_448"), "mask_rcnn")["clip_grad"] is None
