"""Released PIIP-LLaVA folders: variant detection, strict key mapping, conversion reproducing logits.

The official-layout folders are made by the test (``to_official_llava_state_dict`` of a tiny random
model, two safetensors shards + index + a LLaVA-fork config.json + a SentencePiece tokenizer)."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="PIIP-LLaVA is a Hugging Face transformers model")
pytest.importorskip("sentencepiece", reason="the test tokenizer is a SentencePiece model trained in the test")

from safetensors.torch import save_file  # noqa: E402

from piip.cli import main  # noqa: E402
from piip.llava import PiipLlavaForConditionalGeneration, convert_official, detect_variant, from_official  # noqa: E402
from piip.llava.tiny import _ungate, tiny_config, tiny_tower, train_tiny_tokenizer  # noqa: E402
from piip.weights.llava import TOWER, to_official_llava_state_dict  # noqa: E402


def _official_folder(path, kind: str, extra: dict | None = None, drop: str | None = None):
    torch.manual_seed(1)
    model = PiipLlavaForConditionalGeneration(tiny_config(kind)).eval()
    _ungate(model)
    sd = to_official_llava_state_dict(model.state_dict(), model.vision_tower)
    if kind == "convnext":  # the official monkey patch names ConvNeXt layer scales 'weight'
        assert any(k.endswith("blocks.0.weight") and "convnext_model" in k for k in sd)
    sd.update(extra or {})
    if drop:
        sd = {k: v for k, v in sd.items() if drop not in k}
    keys = sorted(sd)
    half = len(keys) // 2
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    text = model.config.text_config.to_dict()
    official = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                     "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}
    official.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                     "mm_vision_tower": "configs/piip-llava_tiny.py", "mm_projector_type": "mlp2x_gelu",
                     "mm_hidden_size": 48, "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048,
                     "tune_mm_mlp_adapter": False, "use_mm_proj": True, "torch_dtype": "float32"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(official, f)
    train_tiny_tokenizer(str(path))
    return model


@pytest.mark.parametrize("kind", ["clip", "convnext"])
def test_official_folder_loads_and_reproduces_logits(tmp_path, kind):
    src = tmp_path / "official"
    ref = _official_folder(src, kind)
    model, processor = from_official(str(src), tower=tiny_tower(kind))
    size = ref.config.image_size
    ids = torch.tensor([[1, 5, 6] + [-200] * 16 + [7, 8]])
    pix = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pix).logits
        got = model(input_ids=ids, pixel_values=pix).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert processor.image_seq_length == 16 and processor.template == "vicuna_v1"
    assert model.config.official_variant == "piip-llava_tiny.py"


def test_unknown_missing_and_mismatched_keys_raise(tmp_path):
    src = tmp_path / "extra"
    _official_folder(src, "clip", extra={TOWER + "interactions.0.interaction_units_12.branch2to1_bogus.w":
                                         torch.zeros(2)})
    with pytest.raises(ValueError, match="bogus"):
        from_official(str(src), tower=tiny_tower("clip"))
    assert not [f for f in os.listdir(src) if f.startswith("piip")]
    src = tmp_path / "missing"
    _official_folder(src, "clip", drop="model.mm_projector.branch1.6.weight")
    with pytest.raises(ValueError, match="missing"):
        convert_official(str(src), str(tmp_path / "out"), tower=tiny_tower("clip"))
    with pytest.raises(ValueError, match="expected a ConvNeXt branch"):   # CLIP weights, ConvNeXt tower
        convert_official(str(tmp_path / "extra"), str(tmp_path / "out2"), tower=tiny_tower("convnext"))
    with pytest.raises(ValueError, match="position table has 5 rows"):   # no released tower matches
        convert_official(str(tmp_path / "extra"), str(tmp_path / "out3"))


def test_detect_variant_from_shapes():
    def shapes(fine: str, pos_rows: int, n: int) -> dict:
        d = {TOWER + "branch1.clip_model.embeddings.position_embedding.weight": (pos_rows, 1024)}
        if fine != "clip":
            d[TOWER + "branch2.convnext_model.stem.0.weight"] = ({"b": 128, "l": 192}[fine], 3, 4, 4)
        d.update({TOWER + f"interactions.{g}.interaction_units_12.branch2to1_proj.weight": (1024, 768)
                  for g in range(n)})
        return d
    assert detect_variant(shapes("clip", 197, 2)) == ("clip_bl_512_256", 2)
    assert detect_variant(shapes("clip", 442, 12)) == ("clip_bl_512_448", 12)
    assert detect_variant(shapes("b", 197, 2)) == ("convnext_b_clip_l_640_224", 2)
    assert detect_variant(shapes("b", 442, 24)) == ("convnext_b_clip_l_1024_336", 24)
    assert detect_variant(shapes("l", 442, 12)) == ("convnext_l_clip_l_1024_336", 12)
    with pytest.raises(ValueError, match="has 12 interactions"):
        detect_variant(shapes("clip", 197, 12))


def test_cli_convert_llava_writes_a_native_folder(tmp_path, capsys):
    src = tmp_path / "official"
    _official_folder(src, "clip")
    out = tmp_path / "native"
    (tmp_path / "tower.json").write_text(json.dumps(tiny_tower("clip").to_dict()))
    assert main(["convert", "llava", str(src), "--out", str(out), "--tower-config", str(tmp_path / "tower.json")]) == 0
    assert "PIIP-LLaVA" in capsys.readouterr().out
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "PiipLlavaForConditionalGeneration"
    assert json.load(open(out / "generation_config.json"))["do_sample"] is False
    assert main(["convert", "llava", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_official_key_names_follow_the_llava_fork():
    """Spot checks of llava_spec §7.3 names (official branch1 = CLIP-L = piip branch 1)."""
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(tiny_config("convnext"))
    sd = to_official_llava_state_dict(model.state_dict(), model.vision_tower)
    p = TOWER
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
                "lm_head.weight", "model.mm_projector.branch1.1.weight", "model.mm_projector.branch2.3.bias",
                "model.mm_projector.branch2.6.weight",
                p + "branch1.clip_model.embeddings.class_embedding", p + "branch1.clip_model.pre_layrnorm.weight",
                p + "branch1.clip_model.encoder.layers.3.self_attn.v_proj.bias",
                p + "branch1.clip_model.encoder.layers.0.layer_norm2.weight",
                p + "branch2.convnext_model.stem.0.weight", p + "branch2.convnext_model.stages.1.downsample.1.weight",
                p + "branch2.convnext_model.stages.0.blocks.0.weight",
                p + "interactions.1.interaction_units_12.branch2to1_proj.weight",
                p + "interactions.0.interaction_units_12.branch1to2_injector.cffn_weight",
                p + "interactions.0.interaction_units_12.branch2to1_injector.attn.sampling_offsets.bias",
                p + "interactions.0.interaction_units_12.branch1to2_injector.ffn.dwconv.dwconv.weight"):
        assert key in sd, key
    assert sd["model.mm_projector.branch1.1.weight"].shape == (64, 48)      # CLIP-L side (48 wide here)
    assert sd[p + "branch1.clip_model.embeddings.position_embedding.weight"].shape == (5, 48)   # 2x2 + class
