"""First-run reliability: every user error is one line and exit code 2, training saves itself on
SIGINT/SIGTERM, a seed fixes the run, training checkpoints load everywhere, commands start light."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from piip.cli import main
from piip.data.synthetic import make_coco

pytest.importorskip("pycocotools", reason="detection data needs the 'detection' extra (pycocotools)")

TINY_ARGS = ["--img-size", "96", "--override", '{"branches": {"embed_dim": 32, "num_heads": 2, "depth": 1}}',
             "--override", "deform_num_heads=2", "--fpn-channels", "32", "--box-head-dim", "64",
             "--mask-head-dim", "32"]
TINY = dict(img_size=96, branches={"embed_dim": 32, "num_heads": 2, "depth": 1}, deform_num_heads=2)
MODEL = "piip_tsb_1120_896_448"


def run_cli(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(a) for a in argv])


def train_args(data: dict, out, *extra) -> list:
    return ["train", "detection", "--train-ann", data["ann"], "--train-images", data["images"], "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--warmup-iters", "1", "--eval-every", "0", "--log-every", "1",
            "--output-dir", out, *TINY_ARGS, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_run")
    ann = make_coco(str(root), num_images=4, image_size=96, max_objects=2, min_object=12, seed=0)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "empty.json").write_text("{}")
    (root / "bad.json").write_text('{"images": [')
    d = json.loads(open(ann).read())
    d["annotations"][0]["category_id"] = 99
    (root / "inconsistent.json").write_text(json.dumps(d))
    (root / "no_images").mkdir()
    (root / "a_file").write_text("x")
    return {"root": root, "ann": ann, "images": str(root / "train"), "img0": str(root / "train" / "000000.png")}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One tiny CLI training run: its checkpoint, and a truncated copy."""
    out = tmp_path_factory.mktemp("run")
    assert run_cli(train_args(data, out)) == 0
    ckpt = out / "checkpoint.pt"
    raw = ckpt.read_bytes()
    bad = out.parent / "truncated.pt"
    bad.write_bytes(raw[: len(raw) // 2])
    return {"dir": out, "ckpt": ckpt, "truncated": bad}


def _cases(data, trained, tmp):
    """(case, argv, text the one-line error must contain)."""
    d, t = data, trained
    eval_args = ["eval", "detection", "--checkpoint", t["ckpt"], "--val-ann", d["ann"], "--workers", "0"]
    return [
        ("demo corrupt image", ["demo", "--image", d["root"] / "broken.png", "--img-size", "64"],
         "not an image Pillow can read"),
        ("demo img-size 0", ["demo", "--img-size", "0"], "--img-size: expected an integer >= 1"),
        ("demo img-size 500", ["demo", "--img-size", "500"], "not a multiple of the finest branch's patch size 16; "
                                                              "use 496 or 512"),
        ("predict corrupt image", ["predict", d["root"] / "broken.png", "--checkpoint", t["ckpt"],
                                   "--out", tmp / "p.png"], "not an image Pillow can read"),
        ("predict truncated checkpoint", ["predict", d["img0"], "--checkpoint", t["truncated"],
                                          "--out", tmp / "p.png"], "truncated"),
        ("predict unknown format", ["predict", d["img0"], "--checkpoint", t["ckpt"], "--out", tmp / "p.gif"],
         "unknown picture format '.gif'"),
        ("predict threshold", ["predict", d["img0"], "--checkpoint", t["ckpt"], "--score-thresh", "2"],
         "expected a number in [0, 1]"),
        ("eval truncated checkpoint", ["eval", "detection", "--checkpoint", t["truncated"], "--val-ann", d["ann"],
                                       "--val-images", d["images"]], "truncated"),
        ("eval every image missing", eval_args + ["--val-images", d["root"] / "no_images"], "none of the 4 images"),
        ("eval annotation {}", ["eval", "detection", "--checkpoint", t["ckpt"], "--val-ann", d["root"] / "empty.json",
                                "--val-images", d["images"]], "not in COCO format"),
        ("train annotation {}", train_args({"ann": d["root"] / "empty.json", "images": d["images"]}, tmp / "o1"),
         "not in COCO format"),
        ("train invalid json", train_args({"ann": d["root"] / "bad.json", "images": d["images"]}, tmp / "o2"),
         "is not valid JSON"),
        ("train inconsistent annotations", train_args({"ann": d["root"] / "inconsistent.json",
                                                       "images": d["images"]}, tmp / "o3"),
         "has category id 99, which is not listed"),
        ("train images missing", train_args({"ann": d["ann"], "images": d["root"] / "no_images"}, tmp / "o4"),
         "none of the 4 images"),
        ("train resume truncated", train_args(d, tmp / "o5", "--resume", t["truncated"]), "truncated"),
        ("train resume missing", train_args(d, tmp / "o6", "--resume", tmp / "nothing.pt"), "does not exist"),
        ("train batch-size 0", train_args(d, tmp / "o7", "--batch-size", "0"), "--batch-size: expected an integer >= 1"),
        ("train epochs 0", train_args(d, tmp / "o8", "--epochs", "0"), "--epochs: expected an integer >= 1"),
        ("train output-dir under a file", train_args(d, d["root"] / "a_file" / "run"), "is a file, not a folder"),
        ("train img-size 100", train_args(d, tmp / "o9", "--img-size", "100"), "use 96 or 112"),
        ("convert truncated", ["convert", "official", t["truncated"], "--out", tmp / "x.safetensors"], "truncated"),
    ]


def test_user_errors_are_one_line_with_exit_code_2(data, trained, tmp_path, capsys):
    failures = []
    for case, argv, text in _cases(data, trained, tmp_path):
        rc = run_cli(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        if rc != 2 or "\n" in err or text not in err or "Traceback" in captured.err + captured.out:
            failures.append(f"{case}: rc={rc} err={captured.err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "p.gif").exists() and not (tmp_path / "o1").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_device_cuda_without_gpu(data, tmp_path, capsys):
    assert run_cli(train_args(data, tmp_path / "o", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is usable here" in err


def test_missing_optional_package_names_the_extra(data, trained, tmp_path, monkeypatch, capsys):
    for mod in ("pycocotools", "pycocotools.coco"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert run_cli(["eval", "detection", "--checkpoint", trained["ckpt"], "--val-ann", data["ann"],
                    "--val-images", data["images"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'piip[detection]'" in err


def test_debug_shows_the_traceback(data, trained):
    with pytest.raises(ValueError, match="truncated"):
        main(["eval", "detection", "--checkpoint", str(trained["truncated"]), "--val-ann", data["ann"],
              "--val-images", data["images"], "--debug"])


def test_resume_of_another_config_is_refused_and_changes_nothing(data, trained, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in trained["dir"].iterdir()}
    argv = train_args(data, trained["dir"], "--resume", "auto")
    argv[argv.index('{"branches": {"embed_dim": 32, "num_heads": 2, "depth": 1}}')] = \
        '{"branches": {"embed_dim": 64, "num_heads": 2, "depth": 1}}'
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different config" in err and "branches.0.embed_dim" in err
    assert MODEL in err
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in trained["dir"].iterdir()}
    assert after == before


def test_finished_run_resumed_without_more_epochs_is_an_error(data, trained, capsys):
    snapshot = trained["ckpt"].read_bytes()
    assert run_cli(train_args(data, trained["dir"], "--resume", "auto")) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert trained["ckpt"].read_bytes() == snapshot


def test_training_checkpoint_is_plain_and_loads_everywhere(trained, tmp_path):
    import piip
    ckpt = torch.load(trained["ckpt"], weights_only=True)       # the safe loader reads it
    assert ckpt["model_name"] == MODEL and ckpt["step"] == 2
    backbone = piip.create_model(MODEL, checkpoint=str(trained["ckpt"]), **TINY)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, ckpt["model"]["backbone.body." + k]), k
    with pytest.raises(ValueError, match="piip detector checkpoint"):   # built without the run's overrides
        piip.create_model(MODEL, checkpoint=str(trained["ckpt"]), img_size=96)
    out = tmp_path / "bb.safetensors"
    assert run_cli(["convert", "official", trained["ckpt"], "--out", out]) == 0
    again = piip.create_model(MODEL, checkpoint=str(out), **TINY)
    for k, v in again.state_dict().items():
        assert torch.equal(v, backbone.state_dict()[k]), k


def test_predict_writes_the_format_of_the_extension(data, trained, tmp_path, capsys):
    for name, magic in (("p.jpg", b"\xff\xd8"), ("p.png", b"\x89PNG")):
        assert run_cli(["predict", data["img0"], "--checkpoint", trained["ckpt"], "--out", tmp_path / name,
                        "--score-thresh", "0"]) == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic


def test_same_seed_same_run(data, tmp_path):
    runs = []
    for i in range(2):
        assert run_cli(train_args(data, tmp_path / str(i), "--seed", "3")) == 0
        runs.append(torch.load(tmp_path / str(i) / "checkpoint.pt", weights_only=True))
    a, b = runs
    assert a["history"][0]["loss"] == b["history"][0]["loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert run_cli(train_args(data, tmp_path / "other", "--seed", "4")) == 0
    c = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=True)
    assert c["history"][0]["loss"] != a["history"][0]["loss"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_checkpoint(data, tmp_path, monkeypatch, capsys, sig):
    import piip.tasks.detection as det
    real = det.detection_forward
    calls = []

    def forward_then_signal(model, batch, device):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)          # arrives during the first step
        return real(model, batch, device)

    monkeypatch.setattr(det, "detection_forward", forward_then_signal)
    handler_before = signal.getsignal(sig)
    out = tmp_path / "run"
    assert run_cli(train_args(data, out, "--epochs", "2")) == 130
    err = capsys.readouterr().err
    name = signal.Signals(sig).name
    assert f"stopped by {name} at step 1" in err and f"--resume {out / 'checkpoint.pt'}" in err
    assert len(calls) == 1                      # stopped before the next batch
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (0, 1, 1)
    monkeypatch.setattr(det, "detection_forward", real)
    assert signal.getsignal(sig) is handler_before   # handlers restored
    assert run_cli(train_args(data, out, "--epochs", "2", "--resume", "auto")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_missing_training_images_are_skipped_with_one_warning(data, tmp_path):
    from piip.data import CocoDetection
    images = tmp_path / "imgs"
    shutil.copytree(data["images"], images)
    os.remove(images / "000001.png")
    with pytest.warns(UserWarning, match="skipping 1 of 4 images missing"):
        ds = CocoDetection(data["ann"], str(images))
    assert len(ds) == 3


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["flops", "piip_tsb_1120_896_448"]])
def test_light_commands_do_not_import_heavy_packages(argv):
    code = ("import sys, io, contextlib\nfrom piip.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    main({argv!r})\n"
            "print(sorted(m for m in ('timm', 'torchvision', 'pycocotools', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_models_prints_a_header(capsys):
    assert main(["models", "vitdet*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "resolutions"] and lines[1].startswith("vitdet_b_1024")


def test_too_small_input_names_a_size_that_works():
    import piip
    # 64 wide: GroupNorm(32) in the merge has 2 channels per group, so even a 1x1 branch map is valid
    model = piip.create_model(MODEL, **{**TINY, "branches": {"embed_dim": 64, "num_heads": 2, "depth": 1}}).eval()
    with pytest.raises(ValueError, match=r"smallest input it takes is (\d+)x\1") as e:
        model(torch.randn(1, 3, 32, 32))
    side = int(str(e.value).split("smallest input it takes is ")[1].split("x")[0])
    with torch.no_grad():
        model(torch.randn(1, 3, side, side))


def test_progress_lines_show_the_rate_of_this_run_and_an_eta(capsys, monkeypatch):
    from piip.engine import progress
    clock = iter([100.0, 104.0])                       # start, then 4 s for 2 steps
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    bar = progress.Progress(10, "epoch 1/1", log_every=2, initial=4)   # resumed at step 4
    bar.update("loss 1")
    bar.update("loss 1")
    line = capsys.readouterr().out.strip()
    assert line == "epoch 1/1 [6/10] 2.00s/it eta 0:08 loss 1"


def test_install_hints_name_extras_that_exist():
    import tomllib
    from pathlib import Path

    from piip.errors import EXTRAS, install_hint
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)
    assert install_hint("transformers.models") == "pip install 'piip[seg]'"
    assert install_hint("scipy.interpolate") == "pip install scipy"
