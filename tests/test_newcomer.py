"""A new user's rough edges (issue 23): each bad input is one line and exit code 2 on the CLI (a
ValueError naming the setting in Python), found before any work; converted weights load by name alone."""
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

import piip
from piip.cli import main

MODEL = "piip_tsb_1120_896_448"
TINY = dict(img_size=64, branches={"embed_dim": 32, "num_heads": 2, "depth": 2}, deform_num_heads=2)
TINY_OVERRIDE = json.dumps(TINY)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny TSB model and its weights saved under the official (OpenGVLab/PIIP) names."""
    torch.manual_seed(0)
    model = piip.create_model(MODEL, **TINY).eval()
    path = tmp_path_factory.mktemp("official") / "tiny_official.pth"
    torch.save({"state_dict": piip.weights.to_official_state_dict(model)}, path)
    return model, path


def test_convert_to_a_missing_folder_is_one_line_before_any_work(official, tmp_path, capsys):
    _, src = official
    out = tmp_path / "missing_dir" / "x.safetensors"
    t0 = time.perf_counter()
    assert main(["convert", "official", str(src), "--model", MODEL, "--override", TINY_OVERRIDE,
                 "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "the folder" in line and "missing_dir" in line and "does not exist" in line
    assert time.perf_counter() - t0 < 5 and not out.parent.exists()


def test_converted_file_loads_by_name_alone(official, tmp_path, capsys):
    model, src = official
    out = tmp_path / "converted.safetensors"
    assert main(["convert", "official", str(src), "--model", MODEL, "--override", TINY_OVERRIDE,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = model(x)
    for loaded in (piip.create_model(checkpoint=str(out)), piip.create_model(MODEL, checkpoint=str(out))):
        assert loaded.cfg == model.cfg
        with torch.no_grad():
            got = loaded.eval()(x)
        assert all(torch.equal(want[k], got[k]) for k in want)
    # a name the file was not made from keeps the registered config (and fails loudly on the shapes)
    with pytest.raises(ValueError, match="does not match this detection model"):
        piip.create_model("vitdet_b_1024", checkpoint=str(out))


def test_save_pretrained_weights_file_carries_its_config(tmp_path):
    model = piip.create_model(MODEL, **TINY).eval()
    piip.weights.save_pretrained(model, str(tmp_path / "m"))
    loaded = piip.create_model(checkpoint=str(tmp_path / "m" / "model.safetensors"))
    assert loaded.cfg == model.cfg


def test_create_model_without_name_or_carried_config_says_what_is_missing(official):
    with pytest.raises(ValueError, match="needs a model name"):
        piip.create_model()
    with pytest.raises(ValueError, match="carries none"):
        piip.create_model(checkpoint=str(official[1]))


def test_heads_out_with_a_piip_detector_checkpoint_is_refused(tmp_path, capsys):
    backbone = piip.create_model(MODEL, **TINY)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": {f"backbone.body.{k}": v for k, v in backbone.state_dict().items()},
                "model_config": {"backbone": backbone.cfg.to_dict()}}, ckpt)
    out, heads = tmp_path / "b.safetensors", tmp_path / "h.safetensors"
    assert main(["convert", "official", str(ckpt), "--out", str(out), "--heads-out", str(heads)]) == 2
    assert "drop --heads-out" in one_line_error(capsys)
    assert not out.exists() and not heads.exists()
    assert main(["convert", "official", str(ckpt), "--out", str(out)]) == 0   # without it: converted


def test_broken_json_override_says_the_json_is_invalid(official, tmp_path, capsys):
    from piip.commands._model_args import parse_overrides
    with pytest.raises(ValueError, match=r"not valid JSON \(Expecting .* at character 17"):
        parse_overrides(['branches=[{"embed_dim":32'])
    assert parse_overrides(["merge=linear"]) == {"merge": "linear"}      # bare words stay strings
    assert main(["convert", "official", str(official[1]), "--model", MODEL, "--override",
                 'branches=[{"embed_dim":32', "--out", str(tmp_path / "x.safetensors")]) == 2
    line = one_line_error(capsys)
    assert "not valid JSON" in line and "entries" not in line
    with pytest.raises(ValueError, match="branches override must be a dict .* or a list of dicts"):
        piip.get_config(MODEL, branches='[{"embed_dim":32')


def test_smallest_input_message_is_the_true_minimum():
    model = piip.create_model(MODEL, img_size=64, branches={"embed_dim": 64, "num_heads": 2, "depth": 1},
                              deform_num_heads=2).eval()
    sides = []
    for side in (16, 32):
        with pytest.raises(ValueError, match=r"smallest input it takes is (\d+)x\1") as e:
            model(torch.randn(1, 3, side, side))
        sides.append(int(re.search(r"smallest input it takes is (\d+)", str(e.value)).group(1)))
    assert sides[0] == sides[1] == 48            # TSB's coarsest branch sees 0.4x: 48 px -> 19 px >= one patch
    with torch.inference_mode():
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("branches, match", [
    ({"embed_dim": 0}, "embed_dim must be a positive integer, got 0"),
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"embed_dim": 30, "num_heads": 4}, "embed_dim 30 is not divisible by num_heads 4; use embed_dim 28 or 32"),
    ({"depth": -1}, "depth must be a positive integer"),
])
def test_bad_branch_widths_are_one_clear_error(branches, match):
    with pytest.raises(ValueError, match=match):
        piip.create_model(MODEL, img_size=64, branches=branches)


def test_img_size_is_checked_in_python_as_on_the_cli(capsys):
    with pytest.raises(ValueError, match="img_size 500 is not a multiple of the finest branch's patch size 16; "
                                         "use 496 or 512"):
        piip.create_model(MODEL, img_size=500)
    assert main(["demo", "--img-size", "500"]) == 2
    assert "500 is not a multiple of the finest branch's patch size 16; use 496 or 512" in one_line_error(capsys)


def test_readme_snippet_runs_the_forward_without_autograd():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    snippet = readme.split("```python", 1)[1].split("```", 1)[0]
    lines = snippet.splitlines()
    forwards = [i for i, ln in enumerate(lines) if re.search(r"\bmodel(\.forward_features)?\(torch\.randn", ln)]
    guard = next(i for i, ln in enumerate(lines) if "torch.inference_mode()" in ln)
    assert forwards and all(i > guard and lines[i].startswith("    ") for i in forwards)


def test_demo_out_is_checked_before_any_work(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "nope" / "d.png")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(["demo", "--out", str(tmp_path / "d.gif")]) == 2
    assert "give a .png or .jpg file name" in one_line_error(capsys)
    assert time.perf_counter() - t0 < 5


def test_demo_draws_the_input_and_every_pyramid_level(tmp_path, capsys):
    from PIL import Image
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(80, 120, 3) * 255).byte().numpy()).save(img)
    out = tmp_path / "features.png"
    assert main(["demo", "--model", "vitdet_b_1024", "--img-size", "64", "--image", str(img), "--out", str(out)]) == 0
    assert f"picture    {out}" in capsys.readouterr().out
    pic = Image.open(out)
    assert pic.height == 276 and pic.width > 5 * 256     # input + 4 levels, 256 px tall under a label strip
    # each level tile is coloured by its own features, not blank. The last level (stride 32 of the
    # 64x48 input) is a 1x2 map, drawn 512 px wide: one colour per position, and which half is
    # white depends on the sign the SVD gives its components, so the whole tile is checked
    tiles = torch.from_numpy(__import__("numpy").asarray(pic.convert("RGB"))).float()[20:]
    assert tiles[:, -512:].std() > 10


# --------------------------------------------------------------------------- hub: fail fast, one line
@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants", reason="needs the 'hub' extra (huggingface_hub)")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    return constants


def test_timm_branch_name_offline_fails_fast_in_one_line(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"pretrained_branches\[0\] = 'vit_tiny_patch16_224': not in the Hugging "
                                         r"Face cache .*HF_HUB_OFFLINE is set") as e:
        piip.create_model(MODEL, pretrained_branches=["vit_tiny_patch16_224", None, None], **TINY)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 20


def test_unreachable_hub_is_one_probe_not_a_minute_of_retries(empty_hub_cache, monkeypatch):
    from piip.weights.hub import from_hub
    from huggingface_hub import hf_hub_download
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(empty_hub_cache, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens: refused at once
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"x: not in the Hugging Face cache .*the Hub cannot be reached "
                                         r"\(127\.0\.0\.1:9: .*\); hint"):
        from_hub(lambda: hf_hub_download("nobody/nothing", "model.safetensors"), "x", "hint")
    assert time.perf_counter() - t0 < 5


def test_chat_with_a_missing_local_folder_says_so(tmp_path, capsys, monkeypatch, empty_hub_cache):
    pytest.importorskip("transformers")
    from PIL import Image
    img = tmp_path / "i.png"
    Image.new("RGB", (32, 32)).save(img)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "converted").mkdir()
    assert main(["chat", "--model", "converted/x", "--image", str(img), "--prompt", "hi"]) == 2
    assert "--model converted/x: no such folder" in one_line_error(capsys)
    assert main(["chat", "--model", "./x", "--image", str(img), "--prompt", "hi"]) == 2
    assert "no such folder" in one_line_error(capsys)
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", True)   # owner/name that is not a local path
    assert main(["chat", "--model", "nobody/nothing", "--image", str(img), "--prompt", "hi"]) == 2
    line = one_line_error(capsys)
    assert "no such local folder; as a hub id" in line and "HF_HUB_OFFLINE is set" in line
