"""CLIP branches: Hugging Face CLIPVisionModel and OpenAI / open_clip tower layouts."""
from __future__ import annotations

import pytest
import torch

from piip.backbone import PIIPBackbone
from piip.branches.flavours import flavour_settings
from piip.config import BranchConfig, PIIPConfig
from piip.weights import load_pretrained_branches

transformers = pytest.importorskip("transformers", reason="the CLIP reference model is transformers' CLIPVisionModel")


def hf_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=56, patch_size=14, hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # move norms and biases off their trivial init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def clip_backbone(patch: int = 14) -> PIIPBackbone:
    branch = BranchConfig(img_size=56 if patch == 14 else 64, embed_dim=64, depth=2, num_heads=2, patch_size=patch, pos_grid=4,
                          **flavour_settings("clip"))
    return PIIPBackbone(PIIPConfig(branches=[branch], merge=None, pyramid=None)).eval()


def to_openai(sd: dict) -> dict:
    """HF CLIPVisionModel names -> OpenAI CLIP ``visual.*`` names (written from the OpenAI model definition)."""
    p = "vision_model."
    out = {"visual.conv1.weight": sd[p + "embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd[p + "embeddings.class_embedding"],
           "visual.positional_embedding": sd[p + "embeddings.position_embedding.weight"],
           "visual.proj": torch.randn(64, 32)}
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for leaf in ("weight", "bias"):
            out[f"visual.{b}.{leaf}"] = sd[f"{p}{a}.{leaf}"]
    for i in range(2):
        src, dst = f"{p}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([sd[src + f"self_attn.{q}_proj.{leaf}"] for q in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{leaf}"] = sd[src + f"{a}.{leaf}"]
    return out


@pytest.mark.parametrize("layout", ["hf", "openai"])
def test_clip_branch_equals_hf_patch_tokens(layout):
    hf = hf_clip()
    sd = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    model = clip_backbone()
    report = load_pretrained_branches(model, [sd if layout == "hf" else to_openai(sd)])[0]
    assert any("folded" in n for n in report.notes)
    for size, interpolate in (((56, 56), False), ((84, 70), True)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want = hf(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state[:, 1:]
            got = model.branches[0].forward_tokens(x).x
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5, (size, (got - want).abs().max())


def test_clip_patch14_kernel_resampled_to_16_and_bad_layouts():
    hf = hf_clip()
    model = clip_backbone(patch=16)
    notes = load_pretrained_branches(model, [hf.state_dict()])[0].notes
    assert any("resampled (14, 14) -> (16, 16)" in n for n in notes)
    assert model.branches[0].patch_embed.proj.bias is None
    out = model.branches[0].forward_tokens(torch.randn(1, 3, 64, 48))
    assert out.hw == (4, 3) and torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="not a CLIP vision tower"):
        load_pretrained_branches(clip_backbone(), [{"patch_embed.proj.weight": torch.zeros(64, 3, 14, 14)}])
    sd = dict(hf.state_dict())
    del sd["encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="block 1 has only"):
        load_pretrained_branches(clip_backbone(), [sd])
