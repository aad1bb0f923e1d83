"""Supported versions (issue 23): bounds declared for the fast-moving dependencies, the installed
releases inside them, CI's pins inside them, and piip.llava right on the transformers installed."""
from __future__ import annotations

import os
import re
import tomllib

import pytest
import torch

packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
FAST_MOVING = {"transformers", "timm", "pillow", "huggingface-hub", "onnx", "onnxruntime", "onnxscript"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _requirements() -> list[Requirement]:
    proj = _project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in proj["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("piip[")]
    return reqs


def _installed(name: str) -> Version | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return Version(version(name))
    except PackageNotFoundError:
        return None


def test_fast_moving_dependencies_have_lower_and_upper_bounds():
    seen = set()
    for req in _requirements():
        name = _norm(req.name)
        if name in FAST_MOVING:
            ops = {s.operator for s in req.specifier}
            assert ops & {">=", ">"} and ops & {"<", "<="}, f"{req} needs a lower and an upper bound"
            seen.add(name)
    assert seen == FAST_MOVING


def test_one_range_per_dependency_across_extras():
    ranges: dict[str, set[str]] = {}
    for req in _requirements():
        ranges.setdefault(_norm(req.name), set()).add(str(req.specifier))
    assert {n: r for n, r in ranges.items() if len(r) > 1} == {}


def test_dev_installs_every_extra():
    extras = _project()["optional-dependencies"]
    dev = [Requirement(r) for r in extras["dev"] if r.startswith("piip[")]
    assert dev and set(dev[0].extras) == set(extras) - {"dev"}


def test_installed_releases_are_inside_the_bounds():
    outside = [f"{req.name} {v} not in {req.specifier}" for req in _requirements()
               if (v := _installed(req.name)) is not None and not req.specifier.contains(v, prereleases=True)]
    assert outside == []


def test_ci_pins_are_inside_the_bounds_and_cover_the_fast_movers():
    pins = {}
    with open(os.path.join(ROOT, "constraints", "ci.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, ver = line.split("==")
                pins[_norm(name)] = Version(ver)
    assert FAST_MOVING | {"torch", "torchvision"} <= set(pins)
    bad = [f"{req.name}=={pins[_norm(req.name)]} not in {req.specifier}" for req in _requirements()
           if _norm(req.name) in pins and not req.specifier.contains(pins[_norm(req.name)], prereleases=True)]
    assert bad == []


def test_ci_installs_into_a_fresh_virtual_environment():
    script = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m venv" in script and 'pip install -q -e ".[dev]"' in script
    assert "pip freeze" in script and "python -m pytest -q" in script


# --------------------------------------------------------------------------- piip.llava on this transformers
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    pytest.importorskip("transformers", reason="piip.llava needs the 'llava' extra (transformers)")
    pytest.importorskip("sentencepiece", reason="the tiny tokenizer needs the 'llava' extra (sentencepiece)")
    from piip.llava.loading import load_model
    from piip.llava.tiny import save_tiny_model
    path = save_tiny_model(str(tmp_path_factory.mktemp("tiny_llava")), "clip")
    model, proc = load_model(path, "fp32", "cpu")
    inputs = proc(proc.prompt("What is in the image?"))
    inputs["pixel_values"] = proc.image_processor.pixel_values(__import__("PIL.Image").Image.new("RGB", (64, 64), "red"))
    return model, proc, inputs


def test_generate_hands_the_kv_cache_under_the_name_this_transformers_uses(tiny_llava):
    from piip.llava.loading import greedy_kwargs
    from piip.llava.modeling import CACHE_NAME
    model, proc, inputs = tiny_llava
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((set(kwargs), kwargs.get(CACHE_NAME))), with_kwargs=True)
    try:
        out = model.generate(**inputs, **greedy_kwargs(proc, 5))
    finally:
        hook.remove()
    names = {"cache", "past_key_values"} - {CACHE_NAME}
    assert len(seen) == out.shape[1] and all(not (keys & names) for keys, _ in seen)
    assert all(cache is not None and cache.get_seq_length() > 0 for _, cache in seen[1:])  # the cache is reused
    # the cached steps give what a full recomputation gives
    with torch.no_grad():
        emb = model.model.embed(inputs["input_ids"], inputs["pixel_values"])
        toks = []
        for _ in range(out.shape[1]):
            t = model(inputs_embeds=emb, use_cache=False).logits[:, -1].argmax(-1)
            toks.append(int(t))
            emb = torch.cat([emb, model.get_input_embeddings()(t)[:, None]], 1)
    assert out[0].tolist() == toks


def test_streamed_text_is_the_answer_even_for_byte_fallback_tokens(tiny_llava, capsys):
    from piip.llava.loading import byte_safe_streamer
    _, proc, _ = tiny_llava
    tok = proc.tokenizer
    byte = lambda b: tok.convert_tokens_to_ids(f"<0x{b:02X}>")  # noqa: E731
    word = tok.convert_tokens_to_ids(tok.tokenize("red")[0])
    # 'B', '0' then bytes that make the run invalid UTF-8: a later byte rewrites what came before
    ids = [byte(0x42), byte(0x30), byte(0x84), byte(0xD4), word, byte(0xE2), byte(0x82)]
    streamer = byte_safe_streamer(tok)
    streamer.put(torch.tensor([[5, 6]]))                      # the prompt: skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert capsys.readouterr().out.strip() == proc.decode(torch.tensor(ids))
