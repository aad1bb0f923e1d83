"""A failing sample, worker, step or evaluation ends a training run within seconds in one line (exit 1),
with every worker reaped and the last completed checkpoint kept and resumable; a second Ctrl-C quits
at once without saving; the default classification recipe (RandAugment rand-m9-mstd0.5-inc1) trains."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

from piip.cli import main
from piip.errors import RunFailed

BRANCHES = [{"embed_dim": 32 * (i + 1), "num_heads": 2, "depth": 1, "drop_path": 0.0} for i in range(3)]
TINY_ARGS = ["--model", "piip_tsb_368_192_128_cls", "--img-size", "64", "--override",
             json.dumps({"branches": BRANCHES, "deform_num_heads": 2})]
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two classes of odd-sized noise images (train 4: one batch per epoch, val 2)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("rel_cls")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(n):
                h, w = int(rng.integers(50, 90)), int(rng.integers(50, 90))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return str(root)


def train(data, out, *extra) -> list[str]:
    return ["train", "classification", *TINY_ARGS, "--data", data, "--batch-size", "4", "--warmup-epochs", "0",
            "--log-every", "1", "--output-dir", str(out), *extra]


def run(argv) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(a) for a in argv])


class Boom:
    """An augmentation that always raises (stands for any broken op)."""

    def __call__(self, img):
        raise ValueError("boom from augmentation")


@pytest.fixture
def failing_aug(monkeypatch):
    """Make the training transform raise while ``state['on']``."""
    import piip.data.classification as dc
    real = dc.build_transforms
    state = {"on": True}

    def build(size, is_train, *a, **k):
        from torchvision import transforms as T
        t = real(size, is_train, *a, **k)
        return T.Compose([Boom(), t]) if is_train and state["on"] else t

    monkeypatch.setattr(dc, "build_transforms", build)
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_augmentation_is_one_line_and_the_checkpoint_survives(data, tmp_path, capsys, failing_aug,
                                                                        workers):
    out = tmp_path / "run"
    failing_aug["on"] = False
    assert run(train(data, out, "--epochs", "1", "--workers", workers, "--eval-every", "0")) == 0
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    failing_aug["on"] = True
    t0 = time.monotonic()
    assert run(train(data, out, "--epochs", "2", "--workers", workers, "--eval-every", "0",
                     "--resume", ckpt)) == 1
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "loading the data of step 2 (epoch 2) failed: sample" in err[0]
    assert "transform Boom failed: ValueError: boom from augmentation" in err[0]
    assert "--auto-augment none" in err[0] and f"--resume {ckpt}" in err[0]
    assert multiprocessing.active_children() == []          # every worker reaped
    assert ckpt.read_bytes() == before                       # the last completed checkpoint is kept
    failing_aug["on"] = False
    assert run(train(data, out, "--epochs", "2", "--workers", workers, "--eval-every", "0", "--resume", ckpt)) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_debug_shows_the_traceback(data, tmp_path, failing_aug):
    with pytest.raises(RunFailed) as e:
        main(train(data, tmp_path, "--epochs", "1", "--workers", "0", "--debug"))
    assert isinstance(e.value.__cause__.__cause__, ValueError)   # RunFailed <- SampleError <- the op's error


def test_a_failing_step_and_a_failing_evaluation(data, tmp_path, capsys, monkeypatch):
    import piip.tasks.classification_train as ct
    real_loss = ct.make_loss

    def loss_failing_at_step_2(*a, **k):
        fn, calls = real_loss(*a, **k), []

        def f(model, batch, device):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return fn(model, batch, device)
        return f

    monkeypatch.setattr(ct, "make_loss", loss_failing_at_step_2)
    out = tmp_path / "a"
    assert run(train(data, out, "--epochs", "2", "--workers", "2", "--eval-every", "0")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training step 2 (epoch 2) failed: RuntimeError: CUDA error" in err[0]
    assert f"--resume {out / 'checkpoint.pt'}" in err[0] and multiprocessing.active_children() == []
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    monkeypatch.setattr(ct, "make_loss", real_loss)

    def broken_eval(*a, **k):
        raise KeyError("top1")
    monkeypatch.setattr(ct, "evaluate_classifier", broken_eval)
    out = tmp_path / "b"
    assert run(train(data, out, "--epochs", "2", "--workers", "0")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the evaluation after epoch 1 failed: KeyError: 'top1'" in err[0]
    assert f"--resume {out / 'checkpoint.pt'}" in err[0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_the_default_recipe_trains_three_epochs(data, tmp_path, capsys):
    """No --auto-augment: the released RandAugment rand-m9-mstd0.5-inc1, through 2 workers."""
    out = tmp_path / "run"
    assert run(train(data, out, "--epochs", "3", "--workers", "2")) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["recipe"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert [h["epoch"] for h in ck["history"]] == [1, 2, 3] and all("top1" in h["eval"] for h in ck["history"])


DRIVER = """
import sys, time
sys.path.insert(0, {src!r})
import piip.data.classification as dc
import piip.tasks.classification_train as ct
real_bt, real_loss = dc.build_transforms, ct.make_loss
MODE = sys.argv[1]

def build(size, is_train, *a, **k):
    t = real_bt(size, is_train, *a, **k)
    if is_train and MODE == "raise":
        def boom(img):
            raise ValueError("boom from augmentation")
        return boom
    return t

def make_loss(*a, **k):
    fn = real_loss(*a, **k)
    def slow(model, batch, device):
        if MODE == "slow":
            print("step", file=sys.stderr, flush=True)
            time.sleep(4)
        return fn(model, batch, device)
    return slow

dc.build_transforms, ct.make_loss = build, make_loss
from piip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _driver(tmp_path, mode: str, argv: list) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(src=SRC)))
    return subprocess.Popen([sys.executable, str(script), mode, *map(str, argv)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)


def test_a_failing_worker_does_not_hang_the_process(data, tmp_path):
    """The bug: the CLI printed the error, then waited forever at exit for workers that ignored SIGTERM."""
    p = _driver(tmp_path, "raise", train(data, tmp_path / "run", "--epochs", "1", "--workers", "2"))
    try:
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "transform boom failed: ValueError: boom" in lines[0], err


def test_a_second_ctrl_c_quits_at_once_without_saving(data, tmp_path):
    out = tmp_path / "run"
    p = _driver(tmp_path, "slow", train(data, out, "--epochs", "2", "--workers", "2", "--eval-every", "0"))
    try:
        t0 = time.monotonic()
        while p.stderr.readline().strip() != "step":
            assert time.monotonic() - t0 < 120 and p.poll() is None
        os.killpg(p.pid, signal.SIGINT)          # the terminal sends Ctrl-C to the whole process group
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("SIGINT: saving a checkpoint after this step"), err
    assert lines[1:] == ["piip train classification: interrupted (second Ctrl-C: quit without saving)"], err
    assert not out.exists() or not os.listdir(out)


def test_a_failing_worker_in_an_eval_command_is_one_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(train(data, out, "--epochs", "1", "--workers", "0", "--eval-every", "0")) == 0
    import piip.data.classification as dc
    real = dc.build_transforms
    monkeypatch.setattr(dc, "build_transforms", lambda size, is_train, *a, **k: Boom() if not is_train
                        else real(size, is_train, *a, **k))
    capsys.readouterr()
    assert run(["eval", "classification", "--checkpoint", out / "checkpoint.pt", "--data", os.path.join(data, "val"),
                "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("piip eval classification: error: sample "), err
    assert "transform Boom failed: ValueError: boom from augmentation (check that file" in err[0]
    assert multiprocessing.active_children() == []
