"""ViT pretraining flavours: a random tiny timm model of each family, saved to disk and loaded into a
branch of that flavour, gives timm's patch-token features; the original files' layouts map too."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import piip
from piip.branches.flavours import flavour_settings
from piip.branches.vit import ViTBranch
from piip.config import BranchConfig
from piip.weights import convert_timm_vit, load_pretrained_branches, read_state_dict, strict_load
from piip.weights.vit_layouts import resize_rel_pos_table

TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _timm(name: str, **kw) -> torch.nn.Module:
    return _randomize(timm.create_model(name, pretrained=False, num_classes=5, **{**TINY_VIT, **kw}))


def _branch(flavour: str, **kw) -> ViTBranch:
    args = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, pos_grid=4, layer_scale=1.0,
                **flavour_settings(flavour))
    args.update(kw)
    return ViTBranch(BranchConfig(**args)).eval()


def _load_from_disk(model: torch.nn.Module, branch: ViTBranch, tmp_path) -> list[str]:
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict()}, path)  # the 'model' wrapper of the original releases
    bsd, _, notes = convert_timm_vit(read_state_dict(path), branch)
    strict_load(branch, bsd)
    return notes


def _timm_patch_tokens(m: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    m.norm = torch.nn.Identity()
    return m.forward_features(img)[:, m.num_prefix_tokens:]


@pytest.mark.parametrize("flavour,timm_name,kw,size", [
    ("deit", "deit3_small_patch16_224", dict(img_size=64, init_values=0.3), 64),
    ("augreg", "vit_small_patch16_224.augreg_in21k", dict(img_size=64), 64),
    ("mae", "vit_base_patch16_224.mae", dict(img_size=64), 64),
    ("dinov2", "vit_small_patch14_dinov2", dict(img_size=56, init_values=0.3), 56),
])
def test_timm_flavour_reproduces_timm_patch_tokens(tmp_path, flavour, timm_name, kw, size):
    m = _timm(timm_name, **kw)
    patch = 14 if flavour == "dinov2" else 16
    branch = _branch(flavour, img_size=size, patch_size=patch, cls_token=True)
    notes = _load_from_disk(m, branch, tmp_path)
    if branch.pos_slot:  # the released layout's unused class slot holds the checkpoint's class position
        assert branch.pos_embed.shape[1] == 1 + 16
        torch.testing.assert_close(branch.pos_embed[:, :1], m.pos_embed[:, :1])
    img = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = branch.forward_tokens(img).x
        ref = _timm_patch_tokens(m, img)
    assert (ours - ref).abs().max() <= 1e-5, notes


def test_beitv2_reproduces_timm_blocks_per_window(tmp_path):
    """timm's BEiT attends with a class token; the branch has none. Reference: timm's own blocks on the
    patch tokens with the class rows/columns of its relative position bias removed."""
    m = _timm("beitv2_base_patch16_224", img_size=64, init_values=0.3)
    branch = _branch("beitv2", window_sizes=[4, 4])
    notes = _load_from_disk(m, branch, tmp_path)
    assert branch.pos_embed is None and branch.blocks[0].attn.qkv.bias is None
    assert any("class-token rows dropped" in n for n in notes)
    for blk in m.blocks:
        full = blk.attn._get_rel_pos_bias
        blk.attn._get_rel_pos_bias = lambda full=full: full()[..., 1:, 1:]
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = m.patch_embed(img)
        for blk in m.blocks:
            x = blk(x)
        ours = branch.forward_tokens(img).x
    assert (ours - x).abs().max() <= 1e-5


def test_beit_rel_pos_table_resize_is_geometric_cubic():
    """An affine bias in the offsets (a + b*dy + c*dx) is reproduced exactly by cubic splines at the
    offsets the table covers; class-token rows are dropped."""
    src, dst = 7, 11  # windows 4 -> 6
    dy, dx = torch.meshgrid(torch.arange(src) - 3.0, torch.arange(src) - 3.0, indexing="ij")
    table = torch.stack([1 + 0.5 * dy + 0.25 * dx, -dy], -1).reshape(-1, 2)
    table = torch.cat([table, torch.randn(3, 2)])  # class rows
    out, note = resize_rel_pos_table(table, 6)
    assert out.shape == (dst * dst, 2) and "7x7 -> 11x11" in note and "class-token rows" in note
    centre = out.reshape(dst, dst, 2)[5, 5]
    torch.testing.assert_close(centre, torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)
    same, note2 = resize_rel_pos_table(table[:-3], 4)
    assert note2 is None and torch.equal(same, table[:-3])


def test_dinov2_original_file_kernel_and_grid_as_released(tmp_path):
    """DINOv2 pretraining file layout (patch 14, 1+37^2 table, mask_token, ls1/ls2): kernel resized to 16
    by plain bicubic, grid 37 -> 32 stored with the class slot, layer scale loaded."""
    m = _timm("vit_small_patch14_dinov2", img_size=518, init_values=0.3, depth=1)
    sd = {**m.state_dict(), "mask_token": torch.zeros(1, 64)}
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(sd, path)
    branch = _branch("dinov2", img_size=512, pos_grid=32, depth=1)
    bsd, _, notes = convert_timm_vit(read_state_dict(path), branch)
    strict_load(branch, bsd)
    k = F.interpolate(m.patch_embed.proj.weight, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(branch.patch_embed.proj.weight, k)
    assert branch.pos_embed.shape == (1, 1 + 32 * 32, 64)
    assert torch.equal(branch.blocks[0].gamma_1, m.blocks[0].ls1.gamma)
    assert any("37x37 -> 32x32" in n for n in notes) and any("bicubic, as the released" in n for n in notes)


def test_uniperceiver_layout_and_embedding():
    """Uni-Perceiver key layout (visual_embed / layers.i.self_attn.in_proj ...) loads; the embedding is
    LayerNorm(eps 1e-5)(proj + bicubic spatial table + temporal row 0)."""
    branch = _branch("uniperceiver", img_size=96, pos_grid=4)
    assert branch.blocks[0].norm1.eps == 1e-5 and branch.embed_norm.eps == 1e-5
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"visual_embed.patch_embed.proj.weight": r(64, 3, 16, 16), "visual_embed.patch_embed.proj.bias": r(64),
          "visual_embed.patch_embed.spatial_pos_embed.weight": r(16, 64),
          "visual_embed.patch_embed.temporal_pos_embed.weight": r(8, 64),
          "visual_embed.embeddings_norm.weight": r(64), "visual_embed.embeddings_norm.bias": r(64)}
    for i in range(2):
        for ours, dims in (("self_attn.in_proj", (192, 64)), ("self_attn.out_proj", (64, 64)),
                           ("linear1", (256, 64)), ("linear2", (64, 256))):
            sd[f"layers.{i}.{ours}.weight"], sd[f"layers.{i}.{ours}.bias"] = r(*dims), r(dims[0])
        for n in ("norm1", "norm2"):
            sd[f"layers.{i}.{n}.weight"], sd[f"layers.{i}.{n}.bias"] = r(64), r(64)
        sd[f"layers.{i}.gamma_1"], sd[f"layers.{i}.gamma_2"] = r(64), r(64)
    bsd, _, notes = convert_timm_vit({"fused_encoder." + k: v for k, v in sd.items()}, branch)
    strict_load(branch, bsd)
    assert any("Uni-Perceiver" in n for n in notes)
    assert torch.equal(branch.blocks[1].attn.qkv.weight, sd["layers.1.self_attn.in_proj.weight"])
    img = torch.randn(1, 3, 96, 96)
    pos = F.interpolate(sd["visual_embed.patch_embed.spatial_pos_embed.weight"].reshape(1, 4, 4, 64)
                        .permute(0, 3, 1, 2), size=(6, 6), mode="bicubic", align_corners=False)
    x = F.conv2d(img, sd["visual_embed.patch_embed.proj.weight"], sd["visual_embed.patch_embed.proj.bias"], 16)
    x = (x + pos).flatten(2).transpose(1, 2) + sd["visual_embed.patch_embed.temporal_pos_embed.weight"][0]
    x = F.layer_norm(x, (64,), sd["visual_embed.embeddings_norm.weight"], sd["visual_embed.embeddings_norm.bias"],
                     1e-5)
    with torch.no_grad():
        torch.testing.assert_close(branch.embed(img).x, x, atol=1e-5, rtol=1e-5)


def test_pretrained_branches_of_a_registered_flavour_model_and_wrong_flavour(tmp_path):
    """create_model(..._beitv2, pretrained_branches=[DeiT III file, BEiTv2 file, BEiTv2 file]) at tiny widths;
    a DeiT file given to a BEiT branch names the keys and what the file looks like."""
    kw = dict(img_size=128, branches=[{"embed_dim": 32, "num_heads": 2, "depth": 2, "window_sizes": [4, 4]}] * 3,
              deform_num_heads=2)
    deit = _timm("deit3_small_patch16_224", img_size=64, init_values=0.3, embed_dim=32)
    beit = _timm("beitv2_base_patch16_224", img_size=64, init_values=0.3, embed_dim=32)
    paths = []
    for name, m in (("deit3.pth", deit), ("beitv2_base_patch16_224_pt1k_ft21k.pth", beit)):
        paths.append(str(tmp_path / name))
        torch.save({"model": m.state_dict()}, paths[-1])
    model = piip.create_model("piip_sbl_1568_1120_672_beitv2", pretrained_branches=[paths[0], paths[1], paths[1]],
                              **kw)
    assert torch.equal(model.branches[2].blocks[1].attn.v_bias, beit.blocks[1].attn.v_bias)
    assert torch.equal(model.branches[0].blocks[0].gamma_2, deit.blocks[0].ls2.gamma)
    with pytest.raises(ValueError, match=r"missing key.*q_bias.*'beitv2' ViT; the file looks like a ViT with ls1/ls2"):
        load_pretrained_branches(model, [None, paths[0], None])


def test_drop_path_schedule_and_interaction_options():
    cfg = piip.get_config("piip_sbl_1568_1120_672_augreg_speedup")
    assert cfg.interaction_proj is False and cfg.interaction_norm is False
    with torch.device("meta"):
        model = piip.build_from_config(cfg)
    blocks = model.branches[2].blocks
    assert blocks[0].drop_path.__class__.__name__ == "Identity"   # linspace starts at 0
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.4)
    assert blocks[0].mlp.act.approximate == "tanh"
    inj = model.interactions[0].edges["1to0"].injector
    assert isinstance(inj.query_norm, torch.nn.Identity) and isinstance(model.interactions[0].edges["1to0"].proj,
                                                                         torch.nn.Identity)
    deit = piip.get_config("piip_sbl_1568_1120_672").branches[1]
    assert deit.drop_path_schedule == "constant" and deit.flavour == "deit"
    with pytest.raises(ValueError, match="unknown ViT flavour"):
        flavour_settings("swin")


def test_uniperceiver_embedding_is_layer_zero_for_layer_decay():
    from piip.engine.optim import layer_ids
    kw = dict(img_size=64, deform_num_heads=2, branches=[{"embed_dim": 32, "num_heads": 2, "depth": 2,
                                                          "window_sizes": [4, 4]}] * 3)
    with torch.device("meta"):
        model = piip.create_model("piip_sbl_1568_1120_672_uniperceiver", **kw)
    ids, _ = layer_ids(model)
    for name in ("temporal_pos_embed", "embed_norm.weight", "pos_embed", "patch_embed.proj.weight"):
        assert ids[f"branches.2.{name}"] == 0, name
    assert ids["branches.2.blocks.0.attn.qkv.weight"] > 0
