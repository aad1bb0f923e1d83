"""PIIP-LLaVA training stages, ``piip train/eval llava`` and ``piip chat`` end to end on tiny models."""
from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="PIIP-LLaVA is a Hugging Face transformers model")
pytest.importorskip("sentencepiece", reason="the test tokenizer is a SentencePiece model trained in the test")

from PIL import Image  # noqa: E402

from piip.cli import main  # noqa: E402
from piip.evaluation.llava import score_pope  # noqa: E402
from piip.llava import PiipLlavaForConditionalGeneration, PiipLlavaProcessor  # noqa: E402
from piip.llava.tiny import _ungate, make_tiny_llava_data, tiny_config, train_tiny_tokenizer  # noqa: E402
from piip.llava.train import LlavaTrainArgs, build_trainer, load_projector, save_stage  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pathlib.Path(make_tiny_llava_data(str(tmp_path_factory.mktemp("llava_data")), n=3))


def _parts(model):
    return {"llm": "model.language_model.", "projector": "model.multi_modal_projector.",
            "fine branch": "model.vision_tower.branches.0.", "coarse branch": "model.vision_tower.branches.1.",
            "interactions": "model.vision_tower.interactions."}


def _run_stage(stage, data, out, tok):
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(tiny_config("clip"))
    _ungate(model)
    proc = PiipLlavaProcessor.from_config(tok, model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = LlavaTrainArgs(stage=stage, data=str(data / ("captions.json" if stage == "pretrain" else "data.json")), image_folder=str(data), out=str(out),
                       batch_size=2, max_steps=2, workers=0, device="cpu", lr=1e-3, log_every=100)
    trainer = build_trainer(model, proc, a)
    trainer.fit()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    return model, proc, changed, trainer


def test_stage1_trains_only_the_projector_stage2_reaches_every_part(data, tmp_path):
    tok = train_tiny_tokenizer(str(tmp_path / "tok"))
    model, proc, changed, _ = _run_stage("pretrain", data, tmp_path / "s1", tok)
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert len(changed) == len(list(model.multi_modal_projector.parameters()))
    path = save_stage(model, proc, "pretrain", str(tmp_path / "s1"))
    fresh = PiipLlavaForConditionalGeneration(tiny_config("clip"))
    load_projector(fresh, path)
    assert torch.equal(fresh.multi_modal_projector.projs[0].fc1.weight, model.multi_modal_projector.projs[0].fc1.weight)
    model, _, changed, trainer = _run_stage("finetune", data, tmp_path / "s2", tok)
    for part, prefix in _parts(model).items():
        assert any(k.startswith(prefix) for k in changed), f"stage 2 did not update the {part}"
    assert os.path.isfile(trainer.checkpoint_path)


def test_cli_train_both_stages_then_eval_and_chat(data, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--tiny", "clip", "--image-folder", str(data), "--batch-size", "2", "--max-steps", "1", "--workers", "0",
              "--device", "cpu"]
    assert main(["train", "llava", "--stage", "pretrain", "--out", str(s1), "--data", str(data / "data.json")]
                + common) == 2   # a text-only sample in stage-1 data: one-line error
    assert main(["train", "llava", "--stage", "pretrain", "--out", str(s1), "--data", str(data / "captions.json")]
                + common) == 0
    assert (s1 / "mm_projector.safetensors").is_file()
    assert main(["train", "llava", "--stage", "finetune", "--out", str(s2), "--projector",
                 str(s1 / "mm_projector.safetensors"), "--data", str(data / "data.json")] + common) == 0
    assert (s2 / "config.json").is_file() and (s2 / "processor_config.json").is_file()

    # POPE: 3 questions with images, labels in the official per-category jsonl files
    q = tmp_path / "pope.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.png", "text": "Is there a dog?",
                                     "category": "random"}) + "\n" for i in range(3)))
    labels = tmp_path / "pope_labels"
    labels.mkdir()
    (labels / "coco_pope_random.json").write_text("".join(json.dumps({"question_id": i, "label": lab}) + "\n"
                                                          for i, lab in enumerate(["yes", "no", "yes"])))
    ans = tmp_path / "answers.jsonl"
    assert main(["eval", "llava", "--benchmark", "pope", "--model", str(s2), "--question-file", str(q),
                 "--image-folder", str(data), "--answers-file", str(ans), "--annotation", str(labels),
                 "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in ans.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2]
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in rows)
    assert main(["eval", "llava", "--benchmark", "pope", "--answers-file", str(ans), "--annotation", str(labels),
                 "--score-only"]) == 0
    assert "random" in score_pope(rows, {"random": {0: "yes", 1: "no", 2: "yes"}})

    # MMBench: a tsv with a base64 image; scored against its own answer column
    buf = io.BytesIO()
    Image.open(data / "0.png").save(buf, format="PNG")
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n"
                   f"7\tWhat is it?\tnan\tcat\tdog\tnan\tnan\tB\t{base64.b64encode(buf.getvalue()).decode()}\n")
    assert main(["eval", "llava", "--benchmark", "mmbench", "--model", str(s2), "--question-file", str(tsv),
                 "--answers-file", str(tmp_path / "mmb.jsonl"), "--device", "cpu"]) == 0
    row = json.loads((tmp_path / "mmb.jsonl").read_text())
    assert row["question_id"] == "7" and row["prompt"].startswith("What is it?\nA. cat\nB. dog\nAnswer with")

    # piip chat in a subprocess streams exactly what generate returns in-process
    from piip.llava.loading import answer, load_model
    model, proc = load_model(str(s2), "fp32", "cpu")
    img = Image.open(data / "1.png").convert("RGB")
    want = answer(model, proc, proc.prompt("What is in the image?"), proc.image_processor.pixel_values(img), 6)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "piip.cli", "chat", "--model", str(s2), "--image", str(data / "1.png"),
                          "--prompt", "What is in the image?", "--max-new-tokens", "6", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == want

def test_chat_bad_image_is_one_line(capsys):
    assert main(["chat", "--model", "tiny", "--image", "nope.png"]) == 2
    assert "--image nope.png: no such file" in capsys.readouterr().err
