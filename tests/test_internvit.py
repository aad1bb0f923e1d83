"""InternViT-6B / MAE-H / DeiT III-L branches (PIIP-H6B, LH6B): an independent transcription of the
released InternViT6B block semantics at tiny widths, strict loading of the official layout, the released
layer decay with a fractional skip stride, and ``with_cp`` giving the same gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import piip
from piip.complexity import count
from piip.engine.optim import param_groups
from piip.weights import to_official_state_dict
from piip.weights.official import official_name

TINY_6B = {"embed_dim": 64, "num_heads": 4, "depth": 2}


def _randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


# ------------------------------------------------------------------ independent transcription
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _internvit_reference(sd: dict, img: torch.Tensor, depth: int, heads: int, approx: str) -> torch.Tensor:
    """InternViT-6B as the released ``internvit_6b.py`` computes it (global attention, qk normalisation over
    the full width before the head split, RMSNorm, ls1/ls2), from official-named tensors."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"][:, 1:]  # slot 0 (class position) is unused
    g = int(math.isqrt(pos.shape[1]))
    pos = F.interpolate(pos.reshape(1, g, g, c).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                        align_corners=False).flatten(2).transpose(1, 2)
    x = x + pos
    hd = c // heads
    for i in range(depth):
        p = f"blocks.{i}."
        y = _rms(x, sd[p + "norm1.weight"])
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"]).chunk(3, dim=-1)
        q, k = _rms(q, sd[p + "attn.q_norm.weight"]), _rms(k, sd[p + "attn.k_norm.weight"])
        q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        x = x + sd[p + "ls1.gamma"] * F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = _rms(x, sd[p + "norm2.weight"])
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate=approx)
        x = x + sd[p + "ls2.gamma"] * F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x


@pytest.mark.parametrize("name,approx", [("internvit_6b_1024", "none"), ("internvit_6b_512_seg", "tanh")])
def test_internvit_branch_matches_independent_transcription_and_loads_strictly(tmp_path, name, approx):
    size = 64 if name.endswith("_seg") else 96  # the seg model stores its table at its own grid
    src = _randomize(piip.create_model(name, img_size=size, branches=TINY_6B))
    official = to_official_state_dict(src)
    assert not any(k.endswith(("attn.qkv.bias", "norm1.bias")) for k in official)  # no qkv bias, RMSNorm
    path = str(tmp_path / "internvit_6b.pth")
    torch.save({"state_dict": official}, path)
    dst = piip.create_model(name, checkpoint=path, img_size=size, branches=TINY_6B).eval()  # strict
    img = torch.randn(2, 3, size, size)
    sd = {k[len("backbone."):]: v for k, v in official.items()}
    with torch.no_grad():
        ref = _internvit_reference(sd, img, 2, 4, approx)
        ours = dst.branches[0].forward_tokens(img).x
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert dst.cfg.branches[0].layer_scale == 0.1 and dst.branches[0].blocks[0].gamma_1 is not None


def test_registered_h6b_family_settings():
    h6b = piip.get_config("piip_h6b_1024_512")
    mae, six = h6b.branches
    assert (mae.embed_dim, mae.depth, mae.flavour, mae.img_size) == (1280, 32, "mae", 1024)
    assert (six.embed_dim, six.depth, six.num_heads, six.norm, six.qk_norm, six.qkv_bias) == \
        (3200, 48, 25, "rms", True, False)
    assert mae.interaction_groups[:5] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 10]] and mae.interaction_groups[-1] == [29, 31]
    assert six.interaction_groups[1] == [4, 7] and mae.with_cp and six.with_cp
    speed = piip.get_config("piip_h6b_1024_512_speedup")
    assert not speed.interaction_proj and not speed.interaction_norm
    assert {b.mlp_act for b in speed.branches} == {"gelu_tanh"}
    lh = piip.get_config("piip_lh6b_1536_1024_512")
    assert [b.embed_dim for b in lh.branches] == [1024, 1280, 3200]
    assert [len(b.interaction_groups) for b in lh.branches] == [4, 4, 4] and lh.branches[0].pos_grid == 24
    assert piip.get_config("piip_h6b_1024_768_dino").pyramid_levels == [1, 2, 3]
    seg = piip.get_config("piip_h6b_512_192_seg")
    assert [b.img_size for b in seg.branches] == [512, 192] and seg.image_norm == "imagenet"


# Released README rows (#Param M, #FLOPs G; vision_spec §C.4): counted within 1%
RELEASED = {"internvit_6b_1024": (5919, 29323), "piip_h6b_1024_512": (6872, 11080),
            "piip_h6b_1024_512_speedup": (6752, 10692), "internvit_6b_512_seg": (5910, 6364),
            "piip_h6b_512_192_seg": (6745, 1663), "piip_h6b_512_256_seg": (6745, 2354),
            "piip_h6b_512_384_seg": (6746, 4374), "piip_h6b_512_512_seg": (6747, 7308)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_params_and_flops(name):
    params, flops = RELEASED[name]
    c = count(name)
    assert c.params / 1e6 == pytest.approx(params, rel=0.01)
    assert c.flops / 1e9 == pytest.approx(flops, rel=0.01)


# ------------------------------------------------------------------ layer decay, skip stride 1.5
def _released_lr_scales(names: list[str], num_layers: int, skip: list[float], rate: float) -> dict[str, float]:
    """The released ``CustomLayerDecayOptimizerConstructorMMDet``: layer id per official name, groups named
    ``layer_%d_<decay>`` (a fractional id truncates) whose scale is set by the first parameter creating it."""
    top = num_layers + 2
    groups, out = {}, {}
    for name in names:
        parts = name.split(".")
        if parts[1].startswith("branch") and parts[2] in ("patch_embed", "pos_embed", "cls_token"):
            lid = 0
        elif parts[1].startswith("branch") and parts[2] == "blocks":
            k, i = int(parts[1][len("branch"):]), int(parts[3])
            lid = i + 1 if k == 1 else (i + 1) * skip[k - 2]
        else:
            lid = top - 1
        key = "layer_%d_%s" % (lid, "x")  # one weight-decay class suffices: ids, not decay, are compared
        groups.setdefault(key, rate ** (top - lid - 1))
        out[name] = groups[key]
    return out


def test_layer_decay_fractional_skip_stride_matches_released():
    # a 6-deep "6B" and a 4-deep "MAE-H": stride 6 / 4 = 1.5, as 48 / 32 in PIIP-H6B
    model = piip.create_model("piip_h6b_1024_512", img_size=64, deform_num_heads=2,
                              branches=[{"embed_dim": 48, "num_heads": 4, "depth": 4, "interaction_groups": [[0, 1], [2, 3]]},
                                        {"embed_dim": 64, "num_heads": 4, "depth": 6, "interaction_groups": [[0, 2], [3, 5]]}])
    ours = {}
    for g in param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.85):
        for n in g["param_names"]:
            ours[n] = g["lr_scale"]
    kinds = [b.kind for b in model.cfg.branches]
    official = {k: "backbone." + official_name(k, 2, kinds) for k in ours}
    # named_parameters order of the released module: branch1 (the 6B) is defined first
    order = sorted(official.values(), key=lambda n: (not n.startswith("backbone.branch1."), list(official.values()).index(n)))
    released = _released_lr_scales(order, 6, [1.5], 0.85)
    for ours_name, off in official.items():
        assert ours[ours_name] == pytest.approx(released[off]), (ours_name, off)
    # MAE-H block 0 -> id floor(1.5) = 1, block 2 -> floor(4.5) = 4
    assert ours["branches.0.blocks.0.attn.qkv.weight"] == pytest.approx(0.85 ** (7 - 1))
    assert ours["branches.0.blocks.2.attn.qkv.weight"] == pytest.approx(0.85 ** (7 - 4))


# ------------------------------------------------------------------ activation checkpointing
def test_with_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    kw = dict(img_size=64, deform_num_heads=2,
              branches=[{"embed_dim": 48, "num_heads": 4, "depth": 2}, {"embed_dim": 64, "num_heads": 4, "depth": 2}],
              interaction_drop_path=0.0)
    a = _randomize(piip.create_model("piip_h6b_1024_512", **kw)).train()
    b = _randomize(piip.create_model("piip_h6b_1024_512", **{**kw, "branches": [
        {**br, "with_cp": False, "drop_path": 0.0} for br in kw["branches"]]})).train()
    for br in a.branches:  # drop path off so that both runs are deterministic
        for blk in br.blocks:
            blk.drop_path = torch.nn.Identity()
    assert a.cfg.branches[0].with_cp and not b.cfg.branches[0].with_cp
    x = torch.randn(1, 3, 64, 64)
    sum(v.sum() for v in a(x).values()).backward()
    sum(v.sum() for v in b(x).values()).backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_pretrained_internvit_file_patch14_grid16_loads_as_released(tmp_path):
    """An ``intern_vit_6b_224px.pth``-like file (patch 14 kernels, class token, 1+16x16 position table,
    RMSNorm / q,k-norm / ls1,ls2 names) initialises the InternViT-6B branch: kernel bicubic 14 -> 16,
    table 16x16 -> 14x14, class slot kept."""
    from piip.weights import load_pretrained_branches
    from piip.weights.vit_layouts import resize_patch_kernel_bicubic
    c, depth = 64, 2
    g = torch.Generator().manual_seed(0)
    sd = {"cls_token": torch.randn(1, 1, c, generator=g), "pos_embed": torch.randn(1, 1 + 16 * 16, c, generator=g),
          "patch_embed.proj.weight": torch.randn(c, 3, 14, 14, generator=g), "patch_embed.proj.bias": torch.zeros(c)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": torch.rand(c, generator=g), p + "norm2.weight": torch.rand(c, generator=g),
                   p + "attn.qkv.weight": torch.randn(3 * c, c, generator=g),
                   p + "attn.q_norm.weight": torch.rand(c, generator=g), p + "attn.k_norm.weight": torch.rand(c, generator=g),
                   p + "attn.proj.weight": torch.randn(c, c, generator=g), p + "attn.proj.bias": torch.zeros(c),
                   p + "ls1.gamma": torch.full((c,), 0.1), p + "ls2.gamma": torch.full((c,), 0.1),
                   p + "mlp.fc1.weight": torch.randn(4 * c, c, generator=g), p + "mlp.fc1.bias": torch.zeros(4 * c),
                   p + "mlp.fc2.weight": torch.randn(c, 4 * c, generator=g), p + "mlp.fc2.bias": torch.zeros(c)})
    path = str(tmp_path / "intern_vit_6b_224px.pth")
    torch.save({"module": sd}, path)
    model = piip.create_model("internvit_6b_1024", img_size=64, branches=TINY_6B)
    load_pretrained_branches(model, [path])
    br = model.branches[0]
    assert torch.equal(br.patch_embed.proj.weight, resize_patch_kernel_bicubic(sd["patch_embed.proj.weight"], 16))
    assert br.pos_embed.shape == (1, 1 + 14 * 14, c) and torch.equal(br.pos_embed[:, :1], sd["pos_embed"][:, :1])
    assert torch.equal(br.blocks[1].attn.k_norm.weight, sd["blocks.1.attn.k_norm.weight"])
    assert torch.equal(br.blocks[0].gamma_2, sd["blocks.0.ls2.gamma"])
