"""Classification training / evaluation: data, recipes, engine additions (EMA, lr multipliers,
accumulation), exact resume and the command line, on a tiny PIIP-TSB and a generated ImageFolder."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from piip.cli import main
from piip.data.classification import ImageClassification, build_transforms, classification_collate
from piip.engine import TrainConfig, Trainer, WarmupSchedule, build_optimizer, build_scheduler, param_groups
from piip.engine.checkpoint import seed_everything
from piip.engine.trainer import split_batch
from piip.registry import create_model
from piip.tasks.classification_train import (NEW_MODULES, NO_DECAY_NAMES, evaluate_classifier,
                                             load_classifier, make_loss, topk_correct)
from piip.zoo.recipes import CLASSIFICATION_RECIPES as RECIPES

CLASSES = ["circle", "square", "triangle"]
BRANCHES = [{"embed_dim": 32 * (i + 1), "num_heads": 2, "depth": 2, "drop_path": 0.0} for i in range(3)]
TINY = dict(img_size=64, branches=BRANCHES, deform_num_heads=2)
TINY_ARGS = ["--model", "piip_tsb_368_192_128_cls", "--img-size", "64", "--override",
             json.dumps({"branches": BRANCHES, "deform_num_heads": 2})]


def draw(path: str, cls: str, rng: np.random.Generator, size=(72, 80)) -> None:
    from PIL import Image, ImageDraw
    im = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 60, 3)))
    d = ImageDraw.Draw(im)
    c = tuple(int(v) for v in rng.integers(150, 256, 3))
    x, y, r = int(rng.integers(22, 50)), int(rng.integers(22, 56)), int(rng.integers(12, 20))
    if cls == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    elif cls == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=c)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=c)
    im.save(path)


def make_folder(root, per_class: dict[str, int], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for cls, n in per_class.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(n):
            draw(os.path.join(root, cls, f"{i}.png"), cls, rng)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_folder(root / "train", {c: 6 for c in CLASSES}, seed=0)
    make_folder(root / "val", {c: 2 for c in CLASSES}, seed=1)
    return str(root)


def tiny(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("piip_tsb_368_192_128_cls", num_classes=num_classes, **TINY)


# ------------------------------------------------------------------------------------------ data
def test_folder_dataset_classes_and_transforms(data):
    ds = ImageClassification(os.path.join(data, "train"), build_transforms(64, True), seed=0)
    assert ds.class_names == CLASSES and len(ds) == 18 and ds.targets[:6] == [0] * 6
    x, y = ds[7]
    assert x.shape == (3, 64, 64) and y == 1
    ds.set_epoch(0)
    assert torch.equal(ds[7][0], x)                # seeded augmentation: a function of (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], x)
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


def test_eval_transform_resizes_then_centre_crops():
    from PIL import Image
    img = Image.fromarray(np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3))
    for ratio in (1.0, 0.875):
        x = build_transforms(64, False, crop_ratio=ratio)(img)
        assert x.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="crop ratio"):
        build_transforms(64, False, crop_ratio=1.5)


def test_csv_and_json_lists(data, tmp_path):
    files = [(os.path.join(data, "train", c, "0.png"), c) for c in CLASSES]
    with open(tmp_path / "list.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{c}\n" for p, c in files))
    ds = ImageClassification(str(tmp_path / "list.csv"))
    assert ds.class_names == CLASSES and ds.targets == [0, 1, 2]
    with open(tmp_path / "list.json", "w") as f:
        json.dump([{"path": os.path.relpath(p, tmp_path), "label": i} for i, (p, _) in enumerate(files)], f)
    ds = ImageClassification(str(tmp_path / "list.json"))
    assert ds.class_names == ["0", "1", "2"] and ds.load(2) is not None   # relative to the list's folder
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("a,b,c\n")
    with pytest.raises(ValueError, match="line 1 has 3 fields"):
        ImageClassification(str(tmp_path / "bad.csv"))


def test_bad_data_documented_behaviour(data, tmp_path):
    root = make_folder(tmp_path / "train", {"circle": 2, "square": 2})
    os.makedirs(tmp_path / "train" / "empty")
    with open(tmp_path / "train" / "square" / "broken.png", "wb") as f:
        f.write(b"\x89PNG not an image")
    with pytest.warns(UserWarning, match="hold no images: \\['empty'\\]"):
        ds = ImageClassification(root, build_transforms(64, False))
    assert ds.class_names == ["circle", "empty", "square"] and len(ds) == 5
    with pytest.warns(UserWarning, match="skipping unreadable image.*broken.png") as rec:
        batch = classification_collate([ds[i] for i in range(len(ds))])
    assert len(rec) == 1 and batch[0].shape[0] == 4 and ds.skipped == {os.path.join(root, "square", "broken.png")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the same file warns only once
        ds[ds.samples.index((os.path.join(root, "square", "broken.png"), 2))]
    # a val/ with a class the training set does not have
    with pytest.raises(ValueError, match="unknown to the training set: \\['triangle'\\]"):
        ImageClassification(os.path.join(data, "val"), class_names=["circle", "square"])
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageClassification(str(tmp_path / "train" / "empty"))
    with pytest.raises(FileNotFoundError):
        ImageClassification(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- loss and metrics
def test_mixup_cutmix_soft_targets_sum_to_one():
    from timm.data import Mixup
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
                  num_classes=5)
    for _ in range(6):
        x, t = mixer(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        assert t.shape == (4, 5) and torch.allclose(t.sum(-1), torch.ones(4))
        assert (t > 0).all()    # smoothing spreads mass on every class
    fwd = make_loss(3, 0.8, 1.0, 0.1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    out = fwd(model, (torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])), torch.device("cpu"))  # odd batch
    assert out["loss_cls"].ndim == 0 and torch.isfinite(out["loss_cls"])


def test_topk_on_a_hand_made_case():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],    # label 1: top-1
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],    # label 4: top-5 only
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])   # label 5: neither
    assert topk_correct(logits, torch.tensor([1, 4, 5])) == {1: 1, 5: 2}
    assert topk_correct(logits[:, :2], torch.tensor([1, 0, 1])) == {1: 2, 5: 3}   # k capped at 2 classes


def test_evaluate_reports_per_class_and_confusion(data, tmp_path):
    ds = ImageClassification(os.path.join(data, "val"), build_transforms(64, False), class_names=CLASSES)
    res = evaluate_classifier(tiny(), ds, torch.device("cpu"), 4, 0, out_path=str(tmp_path / "m.json"))
    conf = torch.tensor(res["confusion"])
    assert conf.shape == (3, 3) and conf.sum() == 6 and res["images"] == 6
    assert res["top1"] == pytest.approx(100 * conf.trace().item() / 6) and res["top5"] == 100.0
    assert set(res["per_class"]) == set(CLASSES)
    assert json.load(open(tmp_path / "m.json"))["class_names"] == CLASSES


# -------------------------------------------------------------------------------------- engine
def test_param_groups_new_module_lr_and_decay_rules():
    model = tiny()
    groups = param_groups(model, 3e-5, 0.1, lr_scales={NEW_MODULES: 10.0}, decay_all=True)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.interactions.0.branch2to1_injector.norm.weight"]["lr"] == pytest.approx(3e-4) \
        if "backbone.interactions.0.branch2to1_injector.norm.weight" in by_name else True
    for n, g in by_name.items():
        new = not n.startswith(("backbone.branches.", "heads."))
        assert g["lr"] == pytest.approx(3e-4 if new else 3e-5), n
        assert g["weight_decay"] == 0.1, n                       # released: decay on every parameter
    groups = param_groups(model, 1e-3, 0.05, no_decay=NO_DECAY_NAMES)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.branches.0.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.branches.0.cls_token"]["weight_decay"] == 0.0
    assert by_name["heads.0.fc.bias"]["weight_decay"] == 0.0 and by_name["heads.0.fc.weight"]["weight_decay"] == 0.05


def test_cosine_floor_is_absolute_for_every_group():
    model = tiny()
    opt = build_optimizer(model, 3e-5, 0.1, lr_scales={NEW_MODULES: 10.0}, decay_all=True)
    sched = build_scheduler(opt, WarmupSchedule(100, 10, 1e-6 / 3e-5, kind="cosine"), min_lr=1e-5)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1e-6, 1e-5])                    # warm-up starts at warmup_lr x group scale
    for _ in range(100):
        opt.step()
        sched.step()
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == pytest.approx([1e-5])


def test_split_batch():
    x, y = torch.arange(8).view(4, 2), torch.arange(4)
    parts = split_batch((x, y, [1, 2, 3, 4]), 2)
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3]] and parts[1][2] == [3, 4]
    with pytest.raises(ValueError, match="micro-batches"):
        split_batch(y, 5)


def _trainer(data, out, mixup=0.0, seed=0, **kw):
    seed_everything(seed)       # as the command does: mixup draws from numpy's global RNG
    ds = ImageClassification(os.path.join(data, "train"), build_transforms(64, True), seed=seed)
    cfg = TrainConfig(output_dir=str(out), epochs=kw.pop("epochs", 2), batch_size=kw.pop("batch_size", 6),
                      lr=kw.pop("lr", 1e-3), weight_decay=0.05, warmup_iters=0, schedule="cosine", lr_steps=[],
                      workers=0, log_every=100, seed=seed, lr_scales={NEW_MODULES: 10.0}, **kw)
    return Trainer(tiny(seed=1), ds, cfg, make_loss(3, mixup, mixup, 0.1 if mixup else 0.0), classification_collate)


def test_training_lowers_the_loss_and_updates_the_ema(data, tmp_path):
    torch.manual_seed(0)
    ds = ImageClassification(os.path.join(data, "train"), build_transforms(64, False))
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=50, batch_size=18, lr=2e-3, weight_decay=0.0, warmup_iters=0,
                      schedule="cosine", lr_steps=[], workers=0, ema_decay=0.5)
    trainer = Trainer(tiny(seed=1), ds, cfg, make_loss(3), classification_collate)
    start = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    batch = classification_collate([ds[i] for i in range(len(ds))])
    losses = [trainer.train_step(batch)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] * 0.8, losses
    key = "heads.0.fc.weight"
    ema, cur = trainer.ema.state_dict()[key], trainer.model.state_dict()[key]
    assert not torch.equal(ema, start[key]) and not torch.equal(ema, cur)


def test_resume_is_exact_with_augmentation_mixup_and_ema(data, tmp_path):
    """Random crops / RandAugment, mixup / cutmix, drop path (interactions) and the EMA all continue
    exactly: the resumed run's next step, and its end, equal the uninterrupted run's."""
    full = _trainer(data, tmp_path / "a", mixup=0.8, ema_decay=0.9)
    full.fit()
    assert full.step == 2 * full.iters_per_epoch == 6
    nxt = _trainer(data, tmp_path / "c", mixup=0.8, ema_decay=0.9, max_steps=5)
    nxt.fit()
    part = _trainer(data, tmp_path / "b", mixup=0.8, ema_decay=0.9, max_steps=4)   # stopped mid-epoch 2
    part.fit()
    saved = torch.load(part.checkpoint_path, weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 1, 4) and "model_ema" in saved
    resumed = _trainer(data, tmp_path / "b", mixup=0.8, ema_decay=0.9)
    resumed.resume(part.checkpoint_path)
    resumed.cfg.max_steps = 5
    resumed.fit()
    for (n, p), q in zip(nxt.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    resumed.cfg.max_steps = None
    resumed.fit()
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k


def test_gradient_accumulation_matches_one_big_batch(data, tmp_path):
    a = _trainer(data, tmp_path / "a", epochs=1)
    b = _trainer(data, tmp_path / "b", epochs=1, accum_steps=3)
    for m in [*a.model.modules(), *b.model.modules()]:   # drop path draws per sample: off for this comparison
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    batch = classification_collate([a.dataset[i] for i in range(6)])
    la, lb = a.train_step(batch)["loss"], b.train_step(batch)["loss"]
    assert la == pytest.approx(lb, rel=1e-5)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n
    with pytest.raises(ValueError, match="accum_steps 4 must"):
        _trainer(data, tmp_path / "c", accum_steps=4)


# ------------------------------------------------------------------------------------------ CLI
def test_recipes_match_the_released_values():
    ft = RECIPES["finetune"]
    assert (ft["lr"], ft["new_lr_scale"], ft["weight_decay"], ft["epochs"], ft["warmup_epochs"], ft["min_lr"]) == \
        (3e-5, 10.0, 0.1, 20, 5, 1e-5)
    assert (ft["mixup"], ft["cutmix"], ft["smoothing"], ft["decay_all"], ft["reprob"]) == (0.8, 1.0, 0.1, True, 0.0)
    sc = RECIPES["scratch"]
    assert (sc["epochs"], sc["lr"], sc["scale_lr"], sc["weight_decay"], sc["drop_path"], sc["decay_all"]) == \
        (300, 5e-4, True, 0.05, 0.1, False)


def test_cli_train_eval_predict(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "classification", *TINY_ARGS, "--data", data, "--epochs", "1", "--batch-size", "6",
                 "--workers", "0", "--output-dir", out, "--warmup-epochs", "0", "--ema-decay", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "3 classes" in text and "ema_top1" in text
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["class_names"] == CLASSES and ck["recipe"]["name"] == "finetune" and ck["train_config"]["decay_all"]
    assert ck["train_config"]["lr_scales"] == {NEW_MODULES: 10.0}
    assert main(["eval", "classification", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--data", data,
                 "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "model: top-1" in text and "ema: top-1" in text
    m = json.load(open(os.path.join(out, "eval", "metrics.json")))
    assert m["images"] == 6 and len(m["confusion"]) == 3
    model, names = load_classifier(os.path.join(out, "checkpoint.pt"), use_ema=True)
    assert names == CLASSES and model.num_classes == 3
    img = os.path.join(data, "val", "square", "0.png")
    assert main(["predict", img, "--checkpoint", os.path.join(out, "checkpoint.pt"), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and sorted(line.split()[1] for line in lines) == CLASSES
    assert sum(float(line.split()[0]) for line in lines) == pytest.approx(1.0, abs=1e-3)
    # a classification checkpoint as the starting point of another run (weights only)
    assert main(["train", "classification", *TINY_ARGS, "--data", data, "--epochs", "1", "--batch-size", "6",
                 "--workers", "0", "--output-dir", str(tmp_path / "again"), "--eval-every", "0", "--max-steps", "1",
                 "--checkpoint", os.path.join(out, "checkpoint.pt")]) == 0


def test_cli_resume_and_scratch_recipe_with_a_csv(data, tmp_path, capsys):
    rows = [f"{os.path.join(data, 'train', c, f'{i}.png')},{c}" for c in CLASSES for i in range(2)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    base = ["train", "classification", *TINY_ARGS, "--recipe", "scratch", "--train", str(tmp_path / "train.csv"),
            "--epochs", "3", "--batch-size", "6", "--workers", "0", "--output-dir", out, "--eval-every", "0",
            "--accum-steps", "2", "--repeated-aug", "3"]
    assert main(base + ["--max-steps", "2"]) == 0
    assert main(base + ["--resume", "auto"]) == 0
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["step"] == 3 and ck["recipe"]["name"] == "scratch"
    assert ck["model_config"]["backbone"]["branches"][0]["drop_path"] == 0.1
    assert ck["train_config"]["lr"] == pytest.approx(5e-4 * 6 / 512) and ck["train_config"]["repeated_aug"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING"], "is not a folder"),
    (["--train", "MISSING.csv"], "does not exist"),
    (["--data", "{data}", "--accum-steps", "4", "--batch-size", "6"], "--accum-steps 4 must divide"),
    (["--data", "{data}", "--crop-ratio", "0"], "expected a number in (0, 1]"),
    (["--data", "{data}", "--model", "piip_tsb_1120_896_448"], "is a dense model"),
    (["--data", "{data}", "--checkpoint", "nope.pt"], "does not exist"),
    (["--data", "{bad}"], "unknown to the training set"),
])
def test_cli_bad_inputs_are_one_line(data, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad"
    make_folder(bad / "train", {"circle": 1})
    make_folder(bad / "val", {"circle": 1, "hexagon": 1})
    extra = [e.format(data=data, bad=bad) for e in extra]
    code = main(["train", "classification", *TINY_ARGS, "--workers", "0", "--output-dir", str(tmp_path / "o"),
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_eval_of_a_detection_or_foreign_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "junk.pt"
    torch.save({"model_config": {"task": "detection"}, "model": {}}, path)
    assert main(["eval", "classification", "--checkpoint", str(path), "--data", str(tmp_path)]) == 2
    assert "holds a detection model" in capsys.readouterr().err


def test_fp16_autocast_with_a_loss_scaler_trains_and_resumes(data, tmp_path):
    a = _trainer(data, tmp_path / "a", epochs=1, amp=True, amp_dtype="float16", max_steps=2)
    assert a.scaler is not None and a.scaler.is_enabled()
    a.fit()
    saved = torch.load(a.checkpoint_path, weights_only=True)
    assert saved["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(p).all() for p in a.model.parameters())
    b = _trainer(data, tmp_path / "b", epochs=1, amp=True, amp_dtype="float16")
    b.resume(a.checkpoint_path)
    assert b.scaler.state_dict() == a.scaler.state_dict()
    assert _trainer(data, tmp_path / "c").scaler is None          # bf16 / off: no scaler
    with pytest.raises(ValueError, match="amp_dtype"):
        _trainer(data, tmp_path / "d", amp_dtype="half")


def test_eval_of_plain_weights_needs_the_model(data, tmp_path, capsys):
    path = str(tmp_path / "weights.pt")
    torch.save(tiny().state_dict(), path)
    assert main(["eval", "classification", "--checkpoint", path, "--data", data, "--workers", "0"]) == 2
    assert "pass the model name (--model)" in capsys.readouterr().err
    assert main(["eval", "classification", "--checkpoint", path, "--data", data, "--workers", "0", *TINY_ARGS,
                 "--override", "num_classes=3", "--out-dir", str(tmp_path / "ev")]) == 0
    assert "model: top-1" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "ev" / "metrics.json") and not os.path.exists(tmp_path / "ev" / "metrics_ema.json")
    assert main(["eval", "classification", "--checkpoint", path, "--data", data, "--workers", "0", *TINY_ARGS,
                 "--override", "num_classes=3", "--val", os.path.join(data, "train", "circle")]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_repeated_augmentation_sampler_and_copies(data):
    from piip.engine import ResumableSampler
    assert list(ResumableSampler(5, False)) == [0, 1, 2, 3, 4]                     # default order unchanged
    s = ResumableSampler(4, False, repeats=3)
    assert list(s) == [0, 4, 8, 1]                                               # copies of 0, then 1; 4 per epoch
    r0, r1 = ResumableSampler(4, False, rank=0, world_size=2, repeats=2), ResumableSampler(4, False, rank=1,
                                                                                         world_size=2, repeats=2)
    assert list(r0) == [0, 1] and list(r1) == [4, 5]                               # the copies go to other ranks
    ds = ImageClassification(os.path.join(data, "train"), build_transforms(64, True), seed=0)
    a, b = ds[0], ds[len(ds)]
    assert a[1] == b[1] and not torch.equal(a[0], b[0])                           # same image, own augmentation
