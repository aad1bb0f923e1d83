"""Weights: timm -> branch equivalence, official layouts, mmdet heads, safetensors round trip."""
from __future__ import annotations

import ast
import os

import pytest
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import piip
from conftest import official_keys_dir
from piip.branches.vit import ViTBranch
from piip.config import BranchConfig
from piip.registry import build_from_config, get_config
from piip.weights import (convert_mmdet_heads, convert_official_state_dict, convert_timm_vit, load_checkpoint,
                          load_pretrained_branches, read_state_dict, strict_load, to_official_state_dict)

KEYS_DIR = official_keys_dir()
TINY = dict(img_size=128, branches={"embed_dim": 32, "num_heads": 2, "depth": 2}, deform_num_heads=2)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _timm_vit(**kw) -> VisionTransformer:
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return _randomize(VisionTransformer(**args).eval())


def _branch(**kw) -> ViTBranch:
    args = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, pos_grid=None, layer_scale=None)
    args.update(kw)
    return ViTBranch(BranchConfig(**args)).eval()


def _timm_tokens(m: VisionTransformer, img: torch.Tensor) -> torch.Tensor:
    """timm token features before the final norm (our branch has no final norm)."""
    m.norm = torch.nn.Identity()
    return m.forward_features(img)


# ---------------------------------------------------------------- timm -> branch
@pytest.mark.parametrize("variant", ["deit", "deit3_layer_scale", "augreg_cls_pos"])
def test_timm_branch_reproduces_timm_tokens(tmp_path, variant):
    kw = {"deit": {}, "deit3_layer_scale": dict(init_values=1e-1, no_embed_class=True),
          "augreg_cls_pos": dict(class_token=True)}[variant]
    m = _timm_vit(**kw)
    path = str(tmp_path / "vit.pth")
    torch.save(m.state_dict(), path)
    branch = _branch(cls_token=True, layer_scale=1.0 if variant == "deit3_layer_scale" else None)
    bsd, _, notes = convert_timm_vit(read_state_dict(path), branch)
    strict_load(branch, bsd)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = branch.forward_tokens(img)
        ref = _timm_tokens(m, img)
    torch.testing.assert_close(t.cls, ref[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.x, ref[:, 1:], atol=1e-5, rtol=1e-5)
    if variant != "deit3_layer_scale":
        assert any("folded into cls_token" in n for n in notes)


def test_timm_layer_scale_folded_and_identity_gammas():
    m = _timm_vit(init_values=0.3)
    branch = _branch(cls_token=True, layer_scale=None)  # no gammas: folded into proj / fc2
    bsd, _, notes = convert_timm_vit(m.state_dict(), branch)
    strict_load(branch, bsd)
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = branch.forward_tokens(img)
        ref = _timm_tokens(m, img)
    torch.testing.assert_close(t.x, ref[:, 1:], atol=1e-5, rtol=1e-5)
    assert any("folded into attn.proj" in n for n in notes)
    # no layer scale in the checkpoint, layer scale in the branch: gammas = 1
    m2 = _timm_vit()
    branch2 = _branch(cls_token=True, layer_scale=0.5)
    bsd2, _, notes2 = convert_timm_vit(m2.state_dict(), branch2)
    strict_load(branch2, bsd2)
    assert all(torch.equal(b.gamma_1, torch.ones(64)) for b in branch2.blocks)
    assert any("set to 1" in n for n in notes2)


def test_timm_pos_embed_resized_to_stored_grid_and_detection_branch():
    """timm trained at 64 (4x4 grid) -> a cls-free branch storing an 8x8 grid, run at 128 px: the same as
    timm's own bicubic resampling of its position table at 128 px (global attention)."""
    m = _timm_vit(dynamic_img_size=True, class_token=True)
    branch = _branch(img_size=128, pos_grid=8, cls_token=False)
    bsd, _, notes = convert_timm_vit(m.state_dict(), branch)
    strict_load(branch, bsd)
    assert any("4x4 -> 8x8" in n for n in notes) and any("class token" in n for n in notes)
    # same table as timm's resampler with the official code's kernel (antialias off: timm's default
    # antialias=True switches PyTorch to a different bicubic kernel)
    from timm.layers import resample_abs_pos_embed
    ref = resample_abs_pos_embed(m.pos_embed.detach(), [8, 8], num_prefix_tokens=1, antialias=False)[:, 1:]
    torch.testing.assert_close(branch.pos_embed.detach(), ref, atol=1e-6, rtol=1e-6)
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ours = branch.embed(img).x
        expect = m.patch_embed(img).flatten(1, 2) + ref  # (B, H, W, C) with dynamic_img_size
    torch.testing.assert_close(ours, expect, atol=1e-5, rtol=1e-5)


def test_timm_patch_kernel_resampled_14_to_16():
    m = _timm_vit(img_size=56, patch_size=14)
    branch = _branch(img_size=64, pos_grid=4)
    bsd, _, notes = convert_timm_vit(m.state_dict(), branch)
    assert bsd["patch_embed.proj.weight"].shape[-2:] == (16, 16)
    assert any("(14, 14) -> (16, 16)" in n for n in notes)
    # FlexiViT property: a 14x14 patch resized to 16x16 through the new kernel gives the old token
    patch = torch.randn(1, 3, 14, 14)
    big = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    old = (m.patch_embed.proj.weight * patch).sum(dim=(1, 2, 3))
    new = (bsd["patch_embed.proj.weight"] * big).sum(dim=(1, 2, 3))
    torch.testing.assert_close(new, old, atol=1e-3, rtol=1e-3)


def test_create_model_pretrained_branches_classifier_matches_timm_logits(tmp_path):
    """Single-branch classifier from a timm checkpoint file: logits equal timm's (norm/head -> heads.0)."""
    m = _timm_vit(num_classes=7)
    path = str(tmp_path / "deit.pth")
    torch.save({"model": m.state_dict()}, path)
    model = piip.create_model("deit_b_224_cls", img_size=64, num_classes=7, pretrained_branches=[path],
                              branches={"embed_dim": 64, "num_heads": 2, "depth": 2}).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(img), m(img), atol=1e-4, rtol=1e-4)


def test_pretrained_branches_errors(tmp_path):
    model = piip.create_model("piip_tsb_1120_896_448", **TINY)
    with pytest.raises(ValueError, match="3 branches"):
        load_pretrained_branches(model, [None])
    with pytest.raises(ValueError, match="neither an existing file nor a timm model name"):
        load_pretrained_branches(model, ["/no/such/file.pth", None, None])
    deep = _timm_vit(embed_dim=32, depth=3)  # branch has 2 blocks of width 32: extra block reported
    with pytest.raises(ValueError, match="unexpected key.*blocks.2"):
        load_pretrained_branches(model, [deep.state_dict(), None, None])
    wide = _timm_vit(embed_dim=64, depth=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained_branches(model, [wide.state_dict(), None, None])


def test_pretrained_branches_into_dense_model_order():
    model = piip.create_model("piip_tsb_1120_896_448", **TINY)
    vit = _timm_vit(embed_dim=32, depth=2)
    reports = load_pretrained_branches(model, [None, None, vit])  # coarsest branch only
    assert reports[0].source is None and reports[2].source is not None
    assert torch.equal(model.branches[2].blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(model.branches[2].blocks[0].gamma_1, torch.ones(32))  # DeiT without layer scale


# ---------------------------------------------------------------- official layouts
def _listing(name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(KEYS_DIR, name)
    if not os.path.isfile(path):
        pytest.skip(f"official key listings not found at {KEYS_DIR} (shared/ must sit beside the clone)")
    sd = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            k, shape = line.rstrip("\n").split("\t")
            sd[k] = torch.empty(ast.literal_eval(shape), device="meta")
    return sd


@pytest.mark.parametrize("listing,model_name,prefix", [
    ("mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.tsv", "piip_tsb_1120_896_448", "backbone."),
    ("mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.tsv", "piip_sbl_1344_896_448", "backbone."),
    ("mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.tsv", "vitdet_b_1024", "backbone."),
    ("piip_3branch_tsb_368-192-128_cls_token_deit1.tsv", "piip_tsb_368_192_128_cls", ""),
])
def test_official_layout_maps_every_key(listing, model_name, prefix):
    sd = {prefix + k: v for k, v in _listing(listing).items()}
    if prefix:
        sd["neck.lateral_convs.0.conv.weight"] = torch.empty(256, 768, 1, 1, device="meta")
    with torch.device("meta"):  # full-size model, names and shapes only
        model = build_from_config(get_config(model_name))
    ours, extra = convert_official_state_dict(sd, model)
    assert set(ours) == set(model.state_dict())
    assert list(extra) == (["neck.lateral_convs.0.conv.weight"] if prefix else [])
    assert set(to_official_state_dict(model)) == set(sd) - set(extra)
    # corrupt: drop one key, add one, change one shape -> all three named
    bad = dict(sd)
    first = next(k for k in bad if "blocks.3.attn.qkv.weight" in k)
    del bad[first]
    bad[prefix + "interactions.99.foo"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError) as e:
        convert_official_state_dict(bad, model)
    assert first[len(prefix):] in str(e.value) and "interactions.99.foo" in str(e.value)
    pos = next(k for k in sd if k.endswith("pos_embed"))
    bad = dict(sd)
    bad[pos] = torch.empty(1, 100, sd[pos].shape[-1], device="meta")
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_official_state_dict(bad, model)


def test_official_checkpoint_round_trip_detection(tmp_path):
    """Tiny TSB: our weights written in the official mmdet layout load back through create_model
    and give identical outputs; the wrong model name gives a clear error."""
    src = _randomize(piip.create_model("piip_tsb_1120_896_448", **TINY)).eval()
    heads = {"neck.fpn_convs.0.conv.weight": torch.randn(256, 256, 3, 3)}
    path = str(tmp_path / "official.pth")
    torch.save({"meta": {"epoch": 12}, "state_dict": {**to_official_state_dict(src), **heads}}, path)
    with pytest.warns(UserWarning, match="neck/head tensors"):
        dst = piip.create_model("piip_tsb_1120_896_448", checkpoint=path, **TINY).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for k in a:
        assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="missing official key"):
        piip.create_model("piip_tsbl_1344_896_672_448", checkpoint=path, **TINY)


def test_official_checkpoint_classification_and_safetensors(tmp_path):
    kw = dict(img_size=64, branches={"embed_dim": 32, "num_heads": 2, "depth": 2}, deform_num_heads=2)
    src = _randomize(piip.create_model("piip_tsb_368_192_128_cls", **kw)).eval()
    path = str(tmp_path / "cls.pth")
    torch.save({"model": to_official_state_dict(src), "epoch": 3}, path)
    dst = piip.create_model("piip_tsb_368_192_128_cls", checkpoint=path, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # the conversion the CLI performs (meta-device model) -> safetensors, loadable by load_checkpoint
    with torch.device("meta"):
        meta_model = build_from_config(get_config("piip_tsb_368_192_128_cls", **kw))
    ours, _ = convert_official_state_dict(read_state_dict(path), meta_model)
    out = str(tmp_path / "cls.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ours.items()}, out)
    again = piip.create_model("piip_tsb_368_192_128_cls", checkpoint=out, **kw).eval()
    with torch.no_grad():
        assert torch.equal(src(x), again(x))


def test_convert_command_full_size_names(tmp_path, capsys):
    """The CLI on a ViTDet-B official-layout file (full size is small enough: 86M params)."""
    sd = {"backbone." + k: torch.zeros(v.shape) for k, v in _listing("mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.tsv").items()}
    src = str(tmp_path / "vitdet.pth")
    torch.save({"state_dict": sd}, src)
    out = str(tmp_path / "vitdet.safetensors")
    from piip.cli import main
    assert main(["convert", "official", src, "--model", "vitdet_b_1024", "--out", out]) == 0
    from safetensors import safe_open
    with safe_open(out, "pt") as f:
        assert f.metadata()["model"] == "vitdet_b_1024"
        assert "pyramid.fpn1.1.weight" in f.keys() and "branches.0.blocks.11.gamma_2" in f.keys()
    assert main(["convert", "official", src, "--model", "piip_tsb_1120_896_448", "--out", out]) == 2
    assert "missing official key" in capsys.readouterr().err


# ---------------------------------------------------------------- mmdet heads -> torchvision
def _mmdet_heads(num_classes: int = 80) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {}
    for i in range(4):
        sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"] = r(256, 768, 1, 1), r(256)
        sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"] = r(256, 256, 3, 3), r(256)
        sd[f"roi_head.mask_head.convs.{i}.conv.weight"] = r(256, 256, 3, 3)
        sd[f"roi_head.mask_head.convs.{i}.conv.bias"] = r(256)
    sd.update({"rpn_head.rpn_conv.weight": r(256, 256, 3, 3), "rpn_head.rpn_conv.bias": r(256),
               "rpn_head.rpn_cls.weight": r(3, 256, 1, 1), "rpn_head.rpn_cls.bias": r(3),
               "rpn_head.rpn_reg.weight": r(12, 256, 1, 1), "rpn_head.rpn_reg.bias": r(12),
               "roi_head.bbox_head.shared_fcs.0.weight": r(1024, 12544),
               "roi_head.bbox_head.shared_fcs.0.bias": r(1024),
               "roi_head.bbox_head.shared_fcs.1.weight": r(1024, 1024),
               "roi_head.bbox_head.shared_fcs.1.bias": r(1024),
               "roi_head.bbox_head.fc_cls.weight": r(num_classes + 1, 1024),
               "roi_head.bbox_head.fc_cls.bias": r(num_classes + 1),
               "roi_head.bbox_head.fc_reg.weight": r(4 * num_classes, 1024),
               "roi_head.bbox_head.fc_reg.bias": r(4 * num_classes),
               "roi_head.mask_head.upsample.weight": r(256, 256, 2, 2),
               "roi_head.mask_head.upsample.bias": r(256),
               "roi_head.mask_head.conv_logits.weight": r(num_classes, 256, 1, 1),
               "roi_head.mask_head.conv_logits.bias": r(num_classes)})
    return sd


def test_convert_mmdet_heads_matches_torchvision_maskrcnn():
    mm = _mmdet_heads()
    tv = convert_mmdet_heads({**mm, "backbone.w1": torch.ones(())})
    ref = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    own = {k: v for k, v in ref.state_dict().items() if k.startswith(("rpn.", "roi_heads."))}
    fpn_keys = {k for k in tv if k.startswith("backbone.fpn.")}
    assert set(tv) - fpn_keys == set(own)
    for k in own:
        assert tv[k].shape == own[k].shape, k
    ref.load_state_dict({**ref.state_dict(), **{k: tv[k] for k in own}})
    # FPN over four 768-wide maps: the mmdet weights load with no missing / unexpected keys
    fpn = FeaturePyramidNetwork([768] * 4, 256, extra_blocks=LastLevelMaxPool())
    fpn.load_state_dict({k[len("backbone.fpn."):]: v for k, v in tv.items() if k in fpn_keys}, strict=True)
    # class order: torchvision 0 = background = mmdet's last classifier row; boxes/masks shifted by one
    assert torch.equal(tv["roi_heads.box_predictor.cls_score.weight"][0], mm["roi_head.bbox_head.fc_cls.weight"][80])
    assert torch.equal(tv["roi_heads.box_predictor.cls_score.weight"][1:], mm["roi_head.bbox_head.fc_cls.weight"][:80])
    assert torch.equal(tv["roi_heads.box_predictor.bbox_pred.weight"][4:8], mm["roi_head.bbox_head.fc_reg.weight"][:4])
    assert torch.equal(tv["roi_heads.mask_predictor.mask_fcn_logits.bias"][1:],
                       mm["roi_head.mask_head.conv_logits.bias"])
    with pytest.raises(ValueError, match="no torchvision equivalent"):
        convert_mmdet_heads({"roi_head.bbox_head.shared_convs.0.conv.weight": torch.zeros(1)})


# ---------------------------------------------------------------- our format
def test_save_from_pretrained_round_trip(tmp_path):
    for name, kw in [("piip_tsb_1120_896_448", TINY),
                     ("piip_tsb_368_192_128_cls", dict(img_size=64, branches={"embed_dim": 32, "num_heads": 2,
                                                                               "depth": 2}, deform_num_heads=2))]:
        model = _randomize(piip.create_model(name, **kw)).eval()
        d = str(tmp_path / name)
        piip.save_pretrained(model, d)
        assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
        again = piip.from_pretrained(d).eval()
        assert again.cfg == model.cfg
        for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
        x = torch.randn(1, 3, 128, 128)
        with torch.no_grad():
            ya, yb = model(x), again(x)
        if isinstance(ya, dict):
            assert all(torch.equal(ya[k], yb[k]) for k in ya)
        else:
            assert torch.equal(ya, yb)
        # our safetensors file also loads through checkpoint=
        again2 = piip.create_model(name, checkpoint=os.path.join(d, "model.safetensors"), **kw)
        assert torch.equal(next(iter(again2.state_dict().values())), next(iter(model.state_dict().values())))


def test_corrupted_safetensors_names_the_keys(tmp_path):
    from safetensors.torch import save_file
    model = piip.create_model("piip_tsb_1120_896_448", **TINY)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.pop("merge.weights.1")
    sd["branches.0.bogus"] = torch.zeros(3)
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(model, path)
    assert "merge.weights.1" in str(e.value) and "branches.0.bogus" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, str(tmp_path / "nope.safetensors"))
