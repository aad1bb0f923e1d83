"""Semantic segmentation: tiny PIIP UperNet on a synthetic set in both layouts (ADE20K, folder)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from piip.data.segmentation import (ADE20K_CLASSES, SegmentationDataset, SegTestTransform, SegTrainTransform,
                                    ade20k, make_segmentation, segmentation_collate)
from piip.engine import TrainConfig, Trainer
from piip.evaluation.segmentation import confusion_matrix, evaluate_segmentor, metrics_from_confusion
from piip.tasks.segmentation import SegmentorConfig, build_segmentor, slide_inference

# 96 px: the coarsest branch (0.4x) still gets a 2x2 grid, which GroupNorm(32) over 32 channels needs
TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
TINY_ARGS = ["--model", "piip_tsb_1120_896_448", "--img-size", "96", "--override", "branches.embed_dim=32", "--override", "branches.num_heads=2",
             "--override", '{"branches": {"depth": 1}, "deform_num_heads": 2}', "--channels", "32",
             "--aux-channels", "16"]


def tiny_segmentor(num_classes: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_segmentor("piip_tsb_1120_896_448", num_classes,
                           SegmentorConfig(**{"channels": 32, "aux_channels": 16, **kw}), **TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seg"))
    ade = os.path.join(root, "ade")
    make_segmentation(ade, 6, (96, 128), "ade20k", "train", seed=0)
    make_segmentation(ade, 2, (96, 128), "ade20k", "val", seed=1)
    folder = os.path.join(root, "folder")
    make_segmentation(folder, 4, (96, 112), "folder", "train", seed=2)
    return {"ade": ade, "folder": folder}


# ---------------------------------------------------------------------- model
def test_forward_shape_and_loss_with_ignore():
    m = tiny_segmentor(5).eval()
    x = torch.rand(2, 3, 96, 80)
    assert m(x).shape == (2, 5, 96, 80)
    assert m(torch.rand(1, 3, 100, 130)).shape == (1, 5, 100, 130)   # padded to 16 inside, cropped back
    m.train()
    masks = torch.randint(0, 5, (2, 96, 80))
    masks[:, :40] = 255
    losses = m.loss(x, masks)
    assert set(losses) == {"loss_decode", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    # ignored pixels do not count: changing them leaves the loss unchanged
    m.eval()
    with torch.no_grad():
        a = m.loss(x, masks)["loss_decode"]
        kept = masks[:, 40:]
        ref = torch.nn.functional.cross_entropy(m(x)[:, :, 40:], kept)     # the same loss on the kept rows only
    assert torch.allclose(a, ref, atol=1e-5)
    # an all-ignore batch gives 0, not NaN
    with torch.no_grad():
        z = m.loss(x, torch.full_like(masks, 255))
    assert all(float(v) == 0 for v in z.values())
    with pytest.raises(ValueError, match="mask value 7"):
        m.loss(x, torch.full_like(masks, 7))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.rand(3, 96, 96))
    assert m(x, masks).keys() == losses.keys()        # forward(images, masks) is the loss entry


def test_a_training_batch_of_one_image_works():
    """The 1x1 pyramid pooling of a single image has one value per channel: BatchNorm falls back to
    its running statistics there instead of failing (an epoch's last partial batch)."""
    m = tiny_segmentor(3).train()
    losses = m.loss(torch.rand(1, 3, 96, 96), torch.randint(0, 3, (1, 96, 96)))
    assert all(torch.isfinite(v) for v in losses.values())


def test_gradients_reach_every_parameter():
    m = tiny_segmentor(3)
    with torch.no_grad():   # the released init zeroes gammas and deformable projections: move them off zero
        for n, p in m.named_parameters():
            if (p == 0).all() or n.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 0.02)
    m.eval()   # no stochastic depth / dropout: a dropped path legitimately gets no gradient
    x, masks = torch.rand(2, 3, 96, 96), torch.randint(0, 3, (2, 96, 96))
    sum(m.loss(x, masks).values()).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing[:10]


def test_structure_and_build_errors():
    m = tiny_segmentor(3)
    assert [len(m.decode_head.psp_modules), len(m.decode_head.lateral_convs)] == [4, 3]
    assert m.auxiliary_head.in_index == 2 and m.seg_cfg.aux_weight == 0.4
    assert m.crop_size == 96 and m.slide_stride == 64 and m.test_size == 96
    assert tiny_segmentor(3, aux_channels=None).auxiliary_head is None
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentor("piip_tsb_1120_896_448", 0, **TINY)
    with pytest.raises(ValueError, match="ignore index"):
        SegmentorConfig(num_classes=300)
    with pytest.raises(ValueError, match="unknown segmentor config keys"):
        SegmentorConfig.from_dict({"num_classes": 3, "chanels": 8})


def test_slide_equals_whole_when_the_crop_covers_the_image():
    m = tiny_segmentor(3).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        whole = m.predict(x, "whole")
        slide = m.predict(x, "slide")
        assert torch.allclose(whole, slide, atol=1e-5)
        # overlapping windows: every pixel averaged over the windows covering it
        y = torch.rand(1, 3, 96, 160)
        s = slide_inference(m, y, 96, 32)
        assert s.shape == (1, 3, 96, 160) and torch.isfinite(s).all()
        assert torch.allclose(s[..., :32], m(y[..., :96])[..., :32], atol=1e-5)   # only the first window


def test_matches_transformers_upernet_head():
    """Same parameter names and computation as Hugging Face's UperNetHead / UperNetFCNHead."""
    tf = pytest.importorskip("transformers", reason="transformers (piip[dev]) compares the head layout")
    from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead
    m = tiny_segmentor(6).eval()
    cfg = tf.UperNetConfig(backbone_config={"model_type": "resnet"}, hidden_size=32, num_labels=6,
                           auxiliary_channels=16, auxiliary_num_convs=1, auxiliary_concat_input=False)
    ch = m.backbone.out_channels
    hf, hf_aux = UperNetHead(cfg, ch).eval(), UperNetFCNHead(cfg, ch).eval()
    hf.load_state_dict(m.decode_head.state_dict())
    hf_aux.load_state_dict(m.auxiliary_head.state_dict())
    feats = [torch.randn(1, c, 24 // 2 ** i, 24 // 2 ** i) for i, c in enumerate(ch)]
    with torch.no_grad():
        assert torch.allclose(hf(feats), m.decode_head(feats), atol=1e-5)
        assert torch.allclose(hf_aux(feats), m.auxiliary_head(feats), atol=1e-5)


def test_import_piip_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, piip, piip.tasks.segmentation, piip.data.segmentation; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- data
def test_ade20k_layout_reduce_zero_label(data):
    ds = ade20k(data["ade"], "train", class_names=os.path.join(data["ade"], "classes.txt"))
    assert len(ds) == 6 and ds.class_names == ["rectangle", "ellipse", "triangle"]
    img, mask = ds[0]
    assert img.shape == (3, 96, 128) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ds.samples[0][1]))
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    assert (mask[torch.from_numpy(raw == 0)] == 255).all()                     # 0 -> ignore
    assert (mask[torch.from_numpy(raw == 2)] == 1).all()                        # v -> v - 1
    assert len(ADE20K_CLASSES) == 150 and ade20k(data["ade"], "val").num_classes == 150


def test_folder_layout_and_train_transform(data):
    root = data["folder"]
    ds = SegmentationDataset(os.path.join(root, "train", "images"), os.path.join(root, "train", "masks"),
                             os.path.join(root, "classes.txt"), transforms=SegTrainTransform(64), seed=3)
    assert ds.num_classes == 4
    a = ds[1]
    assert a[0].shape == (3, 64, 64) and a[1].shape == (64, 64)
    assert torch.equal(ds[1][0], a[0]) and torch.equal(ds[1][1], a[1])         # same (seed, epoch, index)
    ds.set_epoch(1)
    imgs, masks = segmentation_collate([ds[0], ds[1], None])
    assert imgs.shape == (2, 3, 64, 64) and masks.dtype == torch.int64
    # small images are padded with 255 in the mask
    t = SegTrainTransform(200, ratio_range=(1.0, 1.0), img_scale=(120, 40))
    img, mask = t(torch.rand(3, 40, 60), torch.zeros(40, 60, dtype=torch.long))
    assert img.shape == (3, 200, 200) and (mask[40:] == 255).all() and (mask[:40, :60] == 0).all()
    img, mask = SegTestTransform(96)(torch.rand(3, 48, 80), torch.zeros(48, 80, dtype=torch.long))
    assert img.shape == (3, 96, 160) and mask.shape == (48, 80)


def test_bad_data(data, tmp_path):
    from PIL import Image
    img_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    img_dir.mkdir()
    mask_dir.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
    Image.new("L", (32, 32), 1).save(mask_dir / "0.png")
    Image.new("L", (32, 32), 9).save(mask_dir / "1.png")                        # out of range
    (img_dir / "3.png").write_bytes(b"not a png")                               # corrupt image
    Image.new("L", (32, 32), 0).save(mask_dir / "3.png")
    with pytest.warns(UserWarning, match="skipping 1 of 4 images without a mask"):
        ds = SegmentationDataset(str(img_dir), str(mask_dir), "a,b")
    with pytest.raises(ValueError, match=r"1\.png.*value 9"):
        ds[1]
    with pytest.warns(UserWarning, match="skipping unreadable sample '3.png'"):
        img, mask = ds[2]                                                       # substituted by the next one
    assert img.shape == (3, 32, 32) and (mask == 1).all()
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        SegmentationDataset(str(img_dir), str(tmp_path / "nope"), "a,b")
    with pytest.raises(ValueError, match="none of the"):
        SegmentationDataset(str(img_dir), str(tmp_path), "a,b")
    Image.new("RGB", (32, 32)).save(mask_dir / "0.png")
    with pytest.raises(ValueError, match="colour"), pytest.warns(UserWarning):
        SegmentationDataset(str(img_dir), str(mask_dir), "a,b", on_error="raise").load(0)


# ---------------------------------------------------------------------- metrics
def test_miou_on_a_hand_made_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm, ["a", "b", "c", "d"])
    # IoU: a 1/(2+2-1)=1/3, b 2/(2+3-2)=2/3, c 1/(2+1-1)=1/2, d absent everywhere -> NaN (left out)
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3 * 100)
    assert m["aAcc"] == pytest.approx(4 / 6 * 100)
    assert m["per_class"]["d"] == {"IoU": None, "Acc": None}
    assert m["per_class"]["b"]["IoU"] == pytest.approx(66.6667, abs=1e-3)
    with pytest.raises(ValueError, match="value 7"):
        confusion_matrix(pred, torch.full_like(target, 7), 4)


# ---------------------------------------------------------------------- training
def _trainer(ds, out, **kw):
    m = tiny_segmentor(ds.num_classes)
    from piip.tasks.segmentation import segmentation_forward
    from piip.tasks.segmentation import segmentor_config_dict
    cfg = TrainConfig(output_dir=str(out), epochs=kw.pop("epochs", 2), batch_size=2, lr=2e-3, weight_decay=0.01,
                      layer_decay=0.95, warmup_iters=2, warmup_ratio=1e-6, schedule="poly", lr_steps=[],
                      workers=0, device="cpu", log_every=100, **kw)
    return Trainer(m, ds, cfg, segmentation_forward, segmentation_collate,
                   extra_state={"model_config": segmentor_config_dict(m)})


def test_training_steps_lower_the_loss(data, tmp_path):
    ds = ade20k(data["ade"], "train", transforms=SegTrainTransform(96, cat_max_ratio=1.0, photometric=False),
                class_names=os.path.join(data["ade"], "classes.txt"))
    t = _trainer(ds, tmp_path, epochs=1)
    batch = segmentation_collate([ds[0], ds[1]])
    first = [t.train_step(batch)["loss"] for _ in range(8)]
    assert first[-1] < first[0], first


def test_resume_is_exact(data, tmp_path):
    ds = ade20k(data["ade"], "train", transforms=SegTrainTransform(96),
                class_names=os.path.join(data["ade"], "classes.txt"))
    full = _trainer(ds, tmp_path / "a")
    full.fit()
    part = _trainer(ds, tmp_path / "b", max_steps=4)
    part.fit()
    rest = _trainer(ds, tmp_path / "b")
    rest.resume(str(tmp_path / "b" / "checkpoint.pt"))
    rest.fit()
    for (n, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_evaluate_writes_metrics(data, tmp_path):
    ds = ade20k(data["ade"], "val", transforms=SegTestTransform(96), on_error="none",
                class_names=os.path.join(data["ade"], "classes.txt"))
    m = tiny_segmentor(3)
    metrics = evaluate_segmentor(m, ds, out_dir=str(tmp_path), verbose=False)
    assert metrics["num_images"] == 2 and 0 <= metrics["mIoU"] <= 100 and set(metrics["per_class"]) == set(ds.class_names)
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["mode"] == "slide"


# ---------------------------------------------------------------------- CLI
def test_cli_train_eval_ade20k(data, tmp_path, capsys):
    from piip.cli import main
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "segmentation", "--data-root", data["ade"], "--classes",
                   os.path.join(data["ade"], "classes.txt"), *TINY_ARGS, "--epochs", "1", "--batch-size", "2",
                   "--workers", "0", "--warmup-iters", "1", "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "checkpoint.pt").exists() and (out / "eval_epoch1" / "metrics.json").exists()
    rc = main(["eval", "segmentation", "--checkpoint", str(out / "checkpoint.pt"), "--data-root", data["ade"],
               "--workers", "0", "--mode", "whole", "--out-dir", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "ev" / "metrics.json") as f:
        m = json.load(f)
    assert set(m) >= {"mIoU", "mAcc", "aAcc", "per_class"} and m["mode"] == "whole"
    assert "mIoU" in capsys.readouterr().out
    img = os.path.join(data["ade"], "images", "validation", "val_000000.jpg")
    rc = main(["predict", img, "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "p" / "pred.png")])
    assert rc == 0, capsys.readouterr().err
    from PIL import Image
    with Image.open(tmp_path / "p" / "pred.png") as pic:
        assert pic.height == 96 and pic.width > 128                             # image + legend column
    assert "classes present" in capsys.readouterr().out
    assert main(["predict", img, "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "p.gif")]) == 2
    assert "unknown picture format" in capsys.readouterr().err


def test_cli_train_folder_layout(data, tmp_path, capsys):
    from piip.cli import main
    root = data["folder"]
    rc = main(["train", "segmentation", "--train-images", os.path.join(root, "train", "images"),
               "--train-masks", os.path.join(root, "train", "masks"), "--classes", os.path.join(root, "classes.txt"),
               *TINY_ARGS, "--epochs", "1", "--workers", "0", "--eval-every", "0", "--output-dir", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert ck["model_config"]["segmentor"]["class_names"] == SYNTHETIC


SYNTHETIC = ["background", "rectangle", "ellipse", "triangle"]


@pytest.mark.parametrize("argv, message", [
    (["train", "segmentation"], "give --data-root"),
    (["train", "segmentation", "--train-images", "x"], "give both --train-images and --train-masks"),
    (["train", "segmentation", "--train-images", "x", "--train-masks", "y"], "needs --classes"),
    (["train", "segmentation", "--data-root", "/nonexistent/ade"], "ADE20K folder not found"),
    (["eval", "segmentation", "--checkpoint", "/nonexistent.pt", "--data-root", "x"], "does not exist"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    from piip.cli import main
    if argv[0] == "train":
        argv = argv + ["--output-dir", str(tmp_path / "o")] + TINY_ARGS
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_rejects_bad_values(capsys):
    from piip.cli import main
    assert main(["train", "segmentation", "--channels", "0"]) == 2
    assert "an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- registry / FLOPs
@pytest.mark.parametrize("name, paper", [("piip_tsb_896_448_336_seg", 118e9), ("piip_sbl_1120_448_336_seg", 456e9),
                                         ("vit_b_640_seg", 159e9), ("vit_l_640_seg", 545e9)])
def test_segmentation_models_reproduce_the_paper_flops(name, paper):
    from piip.complexity import count
    from piip.zoo.recipes import SEG_RECIPES
    assert abs(count(name).flops / paper - 1) < 0.02
    assert SEG_RECIPES[name]["channels"] == (1024 if "sbl" in name or "vit_l" in name else 512)


def test_registered_segmentation_model_builds_tiny():
    m = build_segmentor("piip_tsb_896_448_336_seg", 3, SegmentorConfig(channels=32, aux_channels=16),
                        img_size=128, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 128, 128)).shape == (1, 3, 128, 128)


# ---------------------------------------------------------------------- Hugging Face AutoBackbone adapter
def test_transformers_upernet_runs_on_a_piip_autobackbone():
    pytest.importorskip("transformers", minversion="5.0", reason="piip[seg]: PIIP as a transformers AutoBackbone")
    from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

    from piip.backbone import PIIPBackbone
    from piip.config import PIIPConfig
    from piip.integrations.transformers import PIIPHFBackbone, piip_backbone_config
    bc = piip_backbone_config("piip_tsb_1120_896_448", **TINY)
    assert isinstance(AutoBackbone.from_config(bc), PIIPHFBackbone)
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=bc, num_labels=4, hidden_size=32,
                                                         auxiliary_channels=16))
    assert model.backbone.channels == [32, 32, 32, 32]
    out = model(pixel_values=torch.randn(2, 3, 96, 96), labels=torch.randint(0, 4, (2, 96, 96)))
    assert out.logits.shape == (2, 4, 96, 96) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.backbone.piip.branches[0].patch_embed.proj.weight.grad is not None
    # transformers' post_init leaves PIIP's own initialisation alone
    torch.manual_seed(0)
    ref = PIIPBackbone(PIIPConfig.from_dict(bc.piip_config)).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.backbone.piip.state_dict().items())
    with pytest.raises(ValueError, match="dense"):
        piip_backbone_config("deit_b_224_cls")


@pytest.mark.heavy
def test_torchrun_two_cpu_processes_train_and_evaluate(data, tmp_path):
    """DDP (gloo) with an uneven split: 6 images over 2 ranks at batch 2, eval of 2 images summed over ranks."""
    import subprocess
    import sys
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "piip.cli", "train", "segmentation", "--data-root", data["ade"], "--classes",
                        os.path.join(data["ade"], "classes.txt"), *TINY_ARGS, "--epochs", "1", "--workers", "0",
                        "--warmup-iters", "1", "--output-dir", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "segmentation (2 images, slide)" in r.stdout
    assert (out / "checkpoint.pt").exists()


def test_poly_schedule_with_linear_warmup():
    from piip.engine import WarmupSchedule
    s = WarmupSchedule(100, warmup_iters=10, warmup_ratio=1e-6, kind="poly")
    assert s(0) == pytest.approx(1e-6) and s(5) == pytest.approx((1e-6 + (1 - 1e-6) * 0.5) * 0.95)
    assert s(10) == pytest.approx(0.9) and s(50) == pytest.approx(0.5) and s(100) == 0.0
    assert WarmupSchedule(100, 0, kind="poly", power=2.0)(50) == pytest.approx(0.25)
