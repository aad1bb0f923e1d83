"""Every registered model reads the official (OpenGVLab/PIIP) checkpoint layout strictly.

``official_layout`` writes, from a model's configuration, the key names and shapes the released code's
modules produce (vision_spec §B.5, §F.3, §F.5), on the meta device (full size, no memory). It is checked
against the key listings of real released models, then every registered ViT-branch model must accept its
own layout (the ConvNeXt/ViT hybrids' layout is checked in test_convnext.py); TSBL files with a 384-wide finest branch, tiny real-valued round trips and mismatches follow.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import warnings

import pytest
import torch
from conftest import official_keys_dir

import piip
from piip.weights.lazy import fast_meta_init as _fast_meta_init
from piip.config import BranchConfig, PIIPConfig
from piip.registry import build_from_config, from_pretrained, get_config, list_models
from piip.weights import (convert_official_state_dict, fit_config_to_checkpoint, save_pretrained,
                          to_official_state_dict)


def _listing(name: str) -> dict[str, tuple]:
    d = official_keys_dir()
    if not os.path.isfile(os.path.join(d, name)):
        pytest.skip("official key listings (shared/reference/official_keys) not found above the clone")
    out = {}
    with open(os.path.join(d, name)) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                k, shape = line.rstrip("\n").split("\t")
                out[k] = tuple(ast.literal_eval(shape))
    return out


# ------------------------------------------------------------------ the released modules' key layout
def _branch_keys(b: BranchConfig, num_classes: int = 0) -> dict[str, tuple]:
    c, heads, g = b.embed_dim, b.num_heads, b.pos_grid or int(b.img_size) // 16
    h = int(c * b.mlp_ratio)
    ln = lambda p: {f"{p}.weight": (c,), f"{p}.bias": (c,)}  # noqa: E731
    lin = lambda p, o, i: {f"{p}.weight": (o, i), f"{p}.bias": (o,)}  # noqa: E731
    out: dict[str, tuple] = {}
    if b.flavour == "uniperceiver":  # uniperceiver.py: UnifiedBertEncoder
        out.update(ln("visual_embed.embeddings_norm"))
        out["visual_embed.patch_embed.spatial_pos_embed.weight"] = (g * g, c)
        out["visual_embed.patch_embed.temporal_pos_embed.weight"] = (8, c)
        out.update({"visual_embed.patch_embed.proj.weight": (c, 3, 16, 16), "visual_embed.patch_embed.proj.bias": (c,)})
        for i in range(b.depth):
            p = f"layers.{i}"
            out.update({**lin(f"{p}.self_attn.in_proj", 3 * c, c), **lin(f"{p}.self_attn.out_proj", c, c),
                        **lin(f"{p}.linear1", h, c), **lin(f"{p}.linear2", c, h), **ln(f"{p}.norm1"),
                        **ln(f"{p}.norm2"), f"{p}.gamma_1": (c,), f"{p}.gamma_2": (c,)})
        return out
    out.update({"patch_embed.proj.weight": (c, 3, 16, 16), "patch_embed.proj.bias": (c,)})
    if b.cls_token:
        out["cls_token"] = (1, 1, c)
    internvit = b.flavour in ("augreg", "dinov2", "mae", "internvit")
    if b.flavour != "beitv2":  # beit.py: use_abs_pos_emb=False
        out["pos_embed"] = (1, int(internvit) + g * g, c)
    six_b = b.flavour == "internvit"  # internvit_6b.py with qk_normalization: RMSNorm (weight only), no qkv bias
    norm = (lambda p: {f"{p}.weight": (c,)}) if six_b else ln  # noqa: E731
    for i, w in enumerate(b.window_sizes):
        p = f"blocks.{i}"
        out.update({**norm(f"{p}.norm1"), **norm(f"{p}.norm2"), **lin(f"{p}.attn.proj", c, c),
                    **lin(f"{p}.mlp.fc1", h, c), **lin(f"{p}.mlp.fc2", c, h)})
        if six_b:
            out.update({f"{p}.attn.qkv.weight": (3 * c, c), **norm(f"{p}.attn.q_norm"), **norm(f"{p}.attn.k_norm")})
        elif b.flavour == "beitv2":
            out.update({f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.q_bias": (c,), f"{p}.attn.v_bias": (c,),
                        f"{p}.attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads),
                        f"{p}.attn.relative_position_index": (w * w, w * w)})
        else:
            out.update(lin(f"{p}.attn.qkv", 3 * c, c))
        if b.layer_scale is not None:
            out.update({f"{p}.ls1.gamma": (c,), f"{p}.ls2.gamma": (c,)} if internvit else
                       {f"{p}.gamma_1": (c,), f"{p}.gamma_2": (c,)})
    if num_classes:
        out.update({**ln("norm"), **lin("head", num_classes, c)})
    return out


def _interaction_keys(dq: int, df: int, cfg: PIIPConfig) -> dict[str, tuple]:
    """One direction of piip_modules.py's interaction unit: the query branch (width dq) reads df."""
    proj, norm = cfg.interaction_proj, cfg.interaction_norm
    dfeat = dq if proj else df
    v, hid = int(dq * cfg.deform_ratio), int(dq * cfg.cffn_ratio)
    hp = cfg.deform_num_heads * cfg.n_points
    out = {"injector.ca_gamma": (dq,), "injector.cffn_gamma": (dq,),
           "injector.attn.sampling_offsets.weight": (hp * 2, dq), "injector.attn.sampling_offsets.bias": (hp * 2,),
           "injector.attn.attention_weights.weight": (hp, dq), "injector.attn.attention_weights.bias": (hp,),
           "injector.attn.output_proj.weight": (dq, v), "injector.attn.output_proj.bias": (dq,),
           "injector.attn.value_proj.weight": (v, dfeat), "injector.attn.value_proj.bias": (v,),
           "injector.ffn.fc1.weight": (hid, dq), "injector.ffn.fc1.bias": (hid,),
           "injector.ffn.dwconv.dwconv.weight": (hid, 1, 3, 3), "injector.ffn.dwconv.dwconv.bias": (hid,),
           "injector.ffn.fc2.weight": (dq, hid), "injector.ffn.fc2.bias": (dq,)}
    if proj:
        out.update({"proj.weight": (dq, df), "proj.bias": (dq,)})
    if norm:
        for n, d in (("query_norm", dq), ("feat_norm", dfeat), ("ffn_norm", dq)):
            out.update({f"injector.{n}.weight": (d,), f"injector.{n}.bias": (d,)})
    return out


def official_layout(cfg: PIIPConfig) -> dict[str, torch.Tensor]:
    """Meta tensors named and shaped as the released model of ``cfg`` stores them (no 'backbone.')."""
    n = len(cfg.branches)
    off = list(reversed(cfg.branches))  # official branch1 = coarsest / widest
    dims = [b.embed_dim for b in off]
    cls = cfg.task == "classification" and cfg.head == "cls_token"
    keys: dict[str, tuple] = {}
    for k, b in enumerate(off, start=1):
        bk = _branch_keys(b, cfg.num_classes if cls else 0)
        keys.update({(f"branch{k}.{s}" if n > 1 else s): v for s, v in bk.items()})
    groups = len(cfg.branches[0].interaction_groups)
    for gi in range(groups if n > 1 else 0):
        for a in range(1, n):
            p = f"interactions.{gi}.interaction_units_{a}{a + 1}"
            for direction, dq, df in (("branch2to1", dims[a - 1], dims[a]), ("branch1to2", dims[a], dims[a - 1])):
                keys.update({f"{p}.{direction}_{s}": v for s, v in _interaction_keys(dq, df, cfg).items()})
    d1 = dims[0]
    gn = lambda p, d: {f"{p}.weight": (d,), f"{p}.bias": (d,)}  # noqa: E731
    if cfg.task == "dense":
        for k, d in enumerate(dims, start=1):
            if n > 1:
                keys.update({f"w{k}": (), f"merge_branch{k}.0.weight": (d1, d, 3, 3), **gn(f"merge_branch{k}.1", d1),
                             f"merge_branch{k}.3.weight": (d1, d1, 3, 3), **gn(f"merge_branch{k}.4", d1)})
        up = "fpn" if n > 1 else "up"
        keys.update({f"{up}1.0.weight": (d1, d1, 2, 2), f"{up}1.0.bias": (d1,), **gn(f"{up}1.1", d1),
                     f"{up}1.3.weight": (d1, d1, 2, 2), f"{up}1.3.bias": (d1,),
                     f"{up}2.0.weight": (d1, d1, 2, 2), f"{up}2.0.bias": (d1,)})
    elif cfg.head == "merged":  # classification piip_3branch.py, separate_head=False
        for k, d in enumerate(dims, start=1):
            keys[f"w{k}"] = ()
            if d == d1:
                keys.update(gn(f"merge_branch{k}", d1))
            else:
                keys.update({**gn(f"merge_branch{k}.0", d), f"merge_branch{k}.2.weight": (d1, d),
                             f"merge_branch{k}.2.bias": (d1,), **gn(f"merge_branch{k}.4", d1)})
        keys.update({**gn("cls_norm", d1), "cls_head.weight": (cfg.num_classes, d1), "cls_head.bias": (cfg.num_classes,)})
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def _meta_model(cfg: PIIPConfig) -> torch.nn.Module:
    with _fast_meta_init():
        return build_from_config(cfg)


def _shapes(sd) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------ the layout writer vs real listings
@pytest.mark.parametrize("listing,name", [
    ("mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.tsv", "piip_sbl_1344_896_448"),
    ("mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.tsv", "piip_tsb_1120_896_448"),
    ("mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.tsv", "vitdet_b_1024"),
    ("piip_3branch_tsb_368-192-128_cls_token_deit1.tsv", "piip_tsb_368_192_128_cls"),
])
def test_layout_writer_matches_released_listings(listing, name):
    assert _shapes(official_layout(get_config(name))) == _listing(listing)


# ------------------------------------------------------------------ every registered model, full size
# ViT-branch models with the simple pyramid; the ConvNeXt branches and regular-FPN merges of the
# Table II models (Hugging Face ConvNextModel names, intermediate merges) are checked against the
# released layout in test_convnext.py::test_official_hybrid_layout_loads_strictly.
# (PIIP-LLaVA towers, task 'features', have the LLaVA fork's layout: tests/test_llava_official.py)
VIT_MODELS = [n for n in list_models()
              if all(b.kind == "vit" for b in get_config(n).branches) and not get_config(n).out_groups
              and get_config(n).task != "features"]


@pytest.mark.parametrize("name", VIT_MODELS)
def test_every_registered_model_reads_its_official_layout(name):
    cfg = get_config(name)
    model = _meta_model(cfg)
    sd = official_layout(cfg)
    ours, extra = convert_official_state_dict({("backbone." if cfg.task == "dense" else "") + k: v
                                               for k, v in sd.items()}, model)
    assert set(ours) == set(model.state_dict()) and not extra
    exported = {k[len("backbone."):] if cfg.task == "dense" else k: v for k, v in to_official_state_dict(model).items()}
    assert _shapes(exported) == _shapes(sd)


def test_tsbl_with_a_384_wide_finest_branch_is_built_as_released():
    cfg = get_config("piip_tsbl_1344_896_672_448")
    released = dataclasses.replace(cfg, branches=[dataclasses.replace(cfg.branches[1], img_size=1344,
                                                                      interaction_groups=cfg.branches[0].interaction_groups),
                                                  *cfg.branches[1:]])
    sd = {"backbone." + k: v for k, v in official_layout(released).items()}
    assert sd["backbone.branch4.patch_embed.proj.weight"].shape[0] == 384
    with pytest.raises(ValueError, match=r"shape mismatch.*branches\.0\.blocks.*finest first: 384-wide deit.*"
                                         r"released 4-branch code's build"):
        convert_official_state_dict(sd, _meta_model(cfg))  # never a silent partial load
    with pytest.warns(UserWarning, match="finest branch is 384 wide.*released 4-branch code") as rec:
        fitted = fit_config_to_checkpoint(cfg, sd, "tsbl.pth")
    assert len(rec) == 1
    assert fitted.branches[0].embed_dim == 384 and fitted.branches[0].img_size == 1344
    ours, _ = convert_official_state_dict(sd, _meta_model(fitted))
    assert ours["branches.0.blocks.11.mlp.fc2.weight"].shape == (384, 1536)
    with warnings.catch_warnings():  # the 192-wide file of the configs: the ViT-T, no warning
        warnings.simplefilter("error")
        assert fit_config_to_checkpoint(cfg, {"backbone." + k: v for k, v in official_layout(cfg).items()}) is cfg


def test_mismatched_file_names_keys_and_the_config_it_looks_like():
    beit = {"backbone." + k: v for k, v in official_layout(get_config("piip_sbl_1568_1120_672_beitv2")).items()}
    with pytest.raises(ValueError) as e:
        convert_official_state_dict(beit, _meta_model(get_config("piip_sbl_1568_1120_672")))
    msg = str(e.value)
    assert "branch1.blocks.0.attn.q_bias" in msg and "branch1.blocks.0.attn.qkv.bias" in msg
    assert "384-wide deit, 768-wide beitv2, 1024-wide beitv2" in msg
    assert "registered models with that layout: piip_sbl_1568_1120_672_beitv2" in msg
    augreg = official_layout(get_config("piip_sbl_1568_1120_672_augreg"))
    with pytest.raises(ValueError, match=r"ls1/ls2 layer scale; registered models with that layout: "
                                         r"piip_sbl_1568_1120_672_augreg\.$"):
        convert_official_state_dict({"backbone." + k: v for k, v in augreg.items()},
                                    _meta_model(get_config("piip_sbl_1568_1120_672_mae")))


# ------------------------------------------------------------------ tiny real-valued round trips
def _tiny(name: str, n: int, img: int = 128) -> dict:
    widths = [32, 64, 96, 128][:n]
    return dict(img_size=img, deform_num_heads=2,
                branches=[{"embed_dim": w, "num_heads": 2, "depth": 2} for w in widths])


def _randomize(m: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


@pytest.mark.parametrize("name", ["piip_sbl_1568_1120_672", "piip_sbl_1568_1120_672_augreg_speedup",
                                  "piip_sbl_1568_1120_672_beitv2", "piip_sbl_1568_1120_672_dinov2",
                                  "piip_sbl_1568_1120_672_mae", "piip_sbl_1568_1120_672_uniperceiver",
                                  "piip_sbl_1792_1120_672_dino", "piip_h6b_1024_512", "piip_h6b_1024_512_speedup",
                                  "piip_lh6b_1536_1024_512"])
def test_official_file_round_trip_per_flavour(tmp_path, name):
    kw = _tiny(name, len(get_config(name).branches), img=64)
    if "dino" in name and "dinov2" not in name:
        kw["branches"] = [{**b, "window_sizes": [4, 0]} for b in kw["branches"]]
    else:
        kw["branches"] = [{**b, "window_sizes": [4, 4]} for b in kw["branches"]]
    src = _randomize(piip.create_model(name, **kw))
    path = str(tmp_path / "official.pth")
    torch.save({"state_dict": to_official_state_dict(src)}, path)
    dst = piip.create_model(name, checkpoint=path, **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert list(a) == (["1", "2", "3"] if name.endswith("_dino") else ["0", "1", "2", "3"])
    for k in a:
        assert torch.equal(a[k], b[k])


def test_tsbl_384_checkpoint_loads_through_create_model(tmp_path):
    name = "piip_tsbl_1344_896_672_448"
    kw = _tiny(name, 4, img=64)
    cfg = get_config(name, **kw)
    released = dataclasses.replace(cfg, branches=[dataclasses.replace(cfg.branches[1], img_size=cfg.branches[0].img_size,
                                                                      interaction_groups=cfg.branches[0].interaction_groups),
                                                  *cfg.branches[1:]])
    src = _randomize(build_from_config(released))
    path = str(tmp_path / "tsbl.pth")
    torch.save({"state_dict": to_official_state_dict(src)}, path)
    with pytest.warns(UserWarning, match="finest branch is 64 wide"):
        dst = piip.create_model(name, checkpoint=path, **kw).eval()
    assert dst.branches[0].cfg.embed_dim == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x)["2"], dst(x)["2"])


@pytest.mark.parametrize("name", ["piip_sbl_320_160_96_cls", "piip_b_512_256_128_cls"])
def test_classifiers_official_layout_and_save_pretrained(tmp_path, name):
    kw = dict(img_size=64, deform_num_heads=2, num_classes=7,
              branches=[{"embed_dim": w, "num_heads": 2, "depth": 2, "window_sizes": [0, 0]} for w in (32, 64, 96)])
    src = _randomize(piip.create_model(name, **kw))
    if name.endswith("96_cls"):  # AugReg classifier: class slot + the branch's own grid
        assert src.backbone.branches[0].pos_embed.shape == (1, 1 + 16, 32)
    else:  # PIIP-B: released GroupNorm(32) + Linear + GroupNorm merging
        assert isinstance(src.backbone.merge.projs[0][0], torch.nn.GroupNorm)
    path = str(tmp_path / "cls.pth")
    torch.save({"model": to_official_state_dict(src)}, path)
    dst = piip.create_model(name, checkpoint=path, **kw).eval()
    save_pretrained(dst, str(tmp_path / "saved"))
    again = from_pretrained(str(tmp_path / "saved")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x)) and torch.equal(src(x), again(x))
