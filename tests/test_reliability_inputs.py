"""Bad inputs to the newer commands, as a user would make them: each ends in one line on stderr and exit
code 2, and overwrites nothing on disk. Checkpoints are written by the engine itself (Trainer.save) on
tiny models, without training, so every task's real checkpoint format is used at little cost."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from piip.cli import main

TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
SEG_ARGS = ["--model", "piip_tsb_896_448_336_seg", "--img-size", "64", "--override",
            json.dumps({"branches": {"embed_dim": 32, "num_heads": 2, "depth": 1}, "deform_num_heads": 2}),
            "--channels", "32", "--no-aux", "--epochs", "1", "--batch-size", "2", "--warmup-iters", "1",
            "--eval-every", "0"]


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes (to prove nothing was written or overwritten)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = fh.read()
    return out


def _save(model, root, name: str, extra: dict) -> str:
    from piip.engine import TrainConfig, Trainer
    t = Trainer(model, list(range(2)), TrainConfig(output_dir=str(root / name), device="cpu", workers=0),
                lambda m, b, d: {}, extra_state=extra)
    t.save()
    return t.checkpoint_path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data of every task, and a checkpoint of every task."""
    pytest.importorskip("pycocotools", reason="detection data needs the 'detection' extra (pycocotools)")
    from PIL import Image

    from piip.data.segmentation import make_segmentation
    from piip.data.synthetic import make_coco
    from piip.registry import create_model
    from piip.tasks.classification_train import classifier_config_dict
    from piip.tasks.detection import DetectorConfig, build_detector, detector_config_dict
    from piip.tasks.segmentation import SegmentorConfig, build_segmentor, segmentor_config_dict
    root = tmp_path_factory.mktemp("inputs")
    ann = make_coco(str(root / "coco"), num_images=2, image_size=64, seed=0)
    make_segmentation(str(root / "seg"), num_images=2, image_size=64, layout="folder")
    for cls in ("a", "b"):
        os.makedirs(root / "cls" / cls)
        Image.new("RGB", (40, 30), (9, 99, 199)).save(root / "cls" / cls / "0.png")
    os.makedirs(root / "a_folder.png")
    (root / "empty.png").write_bytes(b"")
    torch.manual_seed(0)
    br = [{"embed_dim": 32 * (i + 1), "num_heads": 2, "depth": 1} for i in range(3)]
    cls = create_model("piip_tsb_368_192_128_cls", num_classes=2, img_size=64, branches=br, deform_num_heads=2)
    det = build_detector("piip_tsb_1120_896_448", 3, "mask_rcnn",
                         DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32, class_names=["a", "b", "c"]),
                         **TINY)
    seg = build_segmentor(create_model("piip_tsb_896_448_336_seg", **TINY), 4,
                          SegmentorConfig(num_classes=4, channels=32, aux_channels=None))
    ckpts = {
        "classification": _save(cls, root, "cls_run", {"model_config": classifier_config_dict(cls),
                                                       "model_name": "piip_tsb_368_192_128_cls", "class_names": ["a", "b"]}),
        "detection": _save(det, root, "det_run", {"model_config": detector_config_dict(det),
                                                  "model_name": "piip_tsb_1120_896_448"}),
        "segmentation": _save(seg, root, "seg_run", {"model_config": segmentor_config_dict(seg),
                                                     "model_name": "piip_tsb_896_448_336_seg"}),
        "llava": _save(torch.nn.Linear(2, 2), root, "llava_run", {"llava_stage": "pretrain",
                                                                  "config": {"model_type": "piip_llava"}}),
    }
    return {"root": root, "ann": ann, "ckpts": ckpts}


def _eval_args(task: str, w: dict, ckpt: str) -> list:
    r = w["root"]
    data = {"classification": ["--data", r / "cls"],
            "detection": ["--val-ann", w["ann"], "--val-images", r / "coco" / "train"],
            "segmentation": ["--val-images", r / "seg" / "train" / "images", "--val-masks", r / "seg" / "train" / "masks",
                             "--classes", r / "seg" / "classes.txt"]}[task]
    return ["eval", task, "--checkpoint", ckpt, *data, "--workers", "0", "--out-dir", r / "eval_out"]


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_a_checkpoint_of_another_task_to_each_eval_and_predict(world, capsys, task):
    before = snapshot(world["root"])
    for other, ckpt in world["ckpts"].items():
        if other == task:
            continue
        rc, err = run(_eval_args(task, world, ckpt), capsys)
        assert rc == 2 and len(err) == 1 and ckpt in err[0], (task, other, err)
    for which, ckpt in world["ckpts"].items():   # predict: every task's image path mistakes, and llava's checkpoint
        if which != task:
            continue
        for image, says in (("a_folder.png", "is a folder"), ("empty.png", "not an image Pillow can read")):
            rc, err = run(["predict", world["root"] / image, "--checkpoint", ckpt, "--out", world["root"] / "p.png"],
                          capsys)
            assert rc == 2 and len(err) == 1 and says in err[0], (which, image, err)
    rc, err = run(["predict", world["root"] / "cls" / "a" / "0.png", "--checkpoint", world["ckpts"]["llava"],
                   "--out", world["root"] / "p.png"], capsys)
    assert rc == 2 and len(err) == 1
    assert snapshot(world["root"]) == before


def test_segmentation_mask_values_beyond_the_classes(world, tmp_path, capsys):
    """Found by a loader worker at the first batch: one line naming the mask and the value, exit 2;
    a previous run's checkpoint in the output folder is left as it was."""
    from PIL import Image
    src = world["root"] / "seg" / "train"
    shutil.copytree(src, tmp_path / "bad")
    for f in os.listdir(tmp_path / "bad" / "masks"):
        m = np.array(Image.open(tmp_path / "bad" / "masks" / f))
        m[0, 0] = 7                                   # 4 classes: 7 is neither a class id nor 255
        Image.fromarray(m).save(tmp_path / "bad" / "masks" / f)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    before = snapshot(tmp_path)
    rc, err = run(["train", "segmentation", *SEG_ARGS, "--train-images", tmp_path / "bad" / "images",
                   "--train-masks", tmp_path / "bad" / "masks", "--classes", world["root"] / "seg" / "classes.txt",
                   "--workers", "2", "--output-dir", out], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "holds value 7, not a class id of the 4 classes (0..3) nor 255" in err[0]
    assert snapshot(tmp_path) == before


def test_segmentation_images_and_masks_with_other_names(world, tmp_path, capsys):
    src = world["root"] / "seg" / "train"
    shutil.copytree(src, tmp_path / "mis")
    for f in os.listdir(tmp_path / "mis" / "masks"):
        os.rename(tmp_path / "mis" / "masks" / f, tmp_path / "mis" / "masks" / ("mask_" + f))
    rc, err = run(["train", "segmentation", *SEG_ARGS, "--train-images", tmp_path / "mis" / "images",
                   "--train-masks", tmp_path / "mis" / "masks", "--classes", world["root"] / "seg" / "classes.txt",
                   "--workers", "0", "--output-dir", tmp_path / "out"], capsys)
    assert rc == 2 and len(err) == 1 and "has a mask STEM.png" in err[0], err
    assert not (tmp_path / "out").exists()


def test_resume_from_a_folder_with_a_half_written_or_truncated_checkpoint(world, tmp_path, capsys):
    data = open(world["ckpts"]["segmentation"], "rb").read()
    half = tmp_path / "half"
    half.mkdir()
    (half / "checkpoint.pt.tmp4242").write_bytes(data[: len(data) // 2])
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    seg = world["root"] / "seg" / "train"
    common = ["train", "segmentation", *SEG_ARGS, "--train-images", seg / "images", "--train-masks", seg / "masks",
              "--classes", world["root"] / "seg" / "classes.txt", "--workers", "0"]
    before = snapshot(tmp_path)
    rc, err = run([*common, "--output-dir", half, "--resume", half], capsys)
    assert rc == 2 and len(err) == 1 and "half-written checkpoint (checkpoint.pt.tmp4242" in err[0], err
    for resume in (trunc, trunc / "checkpoint.pt", "auto"):
        rc, err = run([*common, "--output-dir", trunc, "--resume", resume], capsys)
        assert rc == 2 and len(err) == 1 and "is truncated or not a torch checkpoint" in err[0], err
    assert snapshot(tmp_path) == before


def test_llava_training_data_mistakes(world, tmp_path, capsys):
    pytest.importorskip("transformers", reason="PIIP-LLaVA needs the 'llava' extra (transformers)")
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20)).save(imgs / "ok.png")
    (imgs / "dir.png").mkdir()
    (imgs / "empty.png").write_bytes(b"")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]
    cases = {"no_conversations": ([{"image": "ok.png"}], "sample 0 has no 'conversations' list"),
             "folder": ([{"image": "ok.png", "conversations": conv}, {"image": "dir.png", "conversations": conv}],
                        "sample 1: image") ,
             "empty": ([{"image": "empty.png", "conversations": conv}], "is empty (0 bytes)")}
    for name, (rows, says) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        out = tmp_path / f"out_{name}"
        rc, err = run(["train", "llava", "--stage", "pretrain", "--tiny", "clip", "--data", path, "--image-folder", imgs,
                       "--out", out, "--batch-size", "1", "--workers", "0"], capsys)
        assert rc == 2 and len(err) == 1 and says in err[0], (name, err)
        assert not out.exists()                      # checked before the tokenizer or anything else is written
