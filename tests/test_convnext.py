"""ConvNeXt branches, ConvNeXt/ViT hybrids with regular-FPN merging, their weights and Table II counts."""
from __future__ import annotations

import re

import pytest
import timm
import torch

import piip
from piip.backbone import PIIPBackbone
from piip.complexity import count
from piip.config import BranchConfig, PIIPConfig, convnext_groups, uniform_groups
from piip.engine import param_groups
from piip.tasks.detection import DetectorConfig, build_detector
from piip.weights import load_checkpoint, load_pretrained_branches, to_official_state_dict

DIMS, DEPTHS = [32, 32, 64, 64], [1, 1, 9, 1]


def cx(res: float, drop_path: float = 0.1) -> BranchConfig:
    return BranchConfig(img_size=res, kind="convnext", stage_dims=DIMS, stage_depths=DEPTHS, layer_scale=0.5,
                        drop_path=drop_path)


def vt(res: float, dim: int = 64) -> BranchConfig:
    return BranchConfig(img_size=res, embed_dim=dim, depth=12, num_heads=2, window_sizes=[4] * 12,
                        interaction_groups=uniform_groups(12, 12))


def hybrid(codes: str, res=(128, 96, 64)) -> PIIPConfig:
    """'cvc' = ConvNeXt finest, ViT middle, ConvNeXt coarsest; released regular-FPN settings, tiny widths."""
    branches = [cx(r) if c == "c" else vt(r) for c, r in zip(codes, res)]
    return PIIPConfig(branches=branches, merge="regular_fpn", out_groups=[0, 1, 10], deform_num_heads=2)


def timm_convnext(ls: float = 0.5) -> torch.nn.Module:
    return timm.models.convnext.ConvNeXt(num_classes=5, depths=tuple(DEPTHS), dims=tuple(DIMS),
                                         ls_init_value=ls).eval()


# ---------------------------------------------------------------------------- the branch
def test_released_cut_widths_and_strides():
    """Flat block list with downsampling layers as blocks (T: 21, S/B/L: 39), 12 groups (vision_spec A.2/A.3)."""
    t, b = piip.get_config("piip_ct_cs_cb_1024_672_448").branches[0], piip.get_config("convnext_b_1024").branches[0]
    assert t.depth == 21 and piip.get_config("piip_ct_cs_cb_1024_672_448").branches[1].depth == 39
    assert convnext_groups([3, 3, 9, 3])[2:4] == [[7, 8], [9, 9]] and convnext_groups([3, 3, 9, 3])[-1] == [17, 20]
    assert convnext_groups([3, 3, 27, 3])[2:4] == [[7, 10], [11, 13]]
    assert b.interaction_groups == [[0, 2], [3, 6], [7, 34], [35, 38]]
    with torch.device("meta"):
        model = piip.create_model("piip_ct_vs_cb_1024_672_448")
    ct, vs, cb = model.branches
    assert ct.group_dims == [96, 192] + [384] * 9 + [768] and ct.group_strides == [4, 8] + [16] * 9 + [32]
    assert cb.group_dims == [128, 256] + [512] * 9 + [1024] and vs.group_strides == [16] * 12
    assert model.out_channels == [128, 256, 512, 1024] and model.out_strides == [4, 8, 16, 32]
    # interactions are built with each group's widths
    assert model.interactions[0].edges["1to0"].proj.weight.shape == (96, 384)
    assert model.interactions[11].edges["1to2"].proj.weight.shape == (1024, 384)


@pytest.mark.parametrize("layout", ["timm", "open_clip", "gamma_as_weight"])
def test_timm_convnext_loads_and_matches_forward_features(tmp_path, layout):
    torch.manual_seed(0)
    ref = timm_convnext()
    sd = ref.state_dict()
    if layout == "open_clip":
        sd = {f"visual.trunk.{k}": v for k, v in sd.items() if not k.startswith("head.")}
        sd["visual.head.proj.weight"] = torch.randn(16, DIMS[-1])
    elif layout == "gamma_as_weight":
        sd = {k.replace(".gamma", ".weight"): v for k, v in sd.items()}
    path = tmp_path / "convnext.pth"
    torch.save(sd, path)
    model = PIIPBackbone(PIIPConfig(branches=[cx(64, 0.0)], merge=None, pyramid=None)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = ref.forward_features(x)
        assert (model.branches[0].forward_map(x) - want).abs().max() > 1e-3  # not loaded yet: differs
        report = load_pretrained_branches(model, [str(path)])[0]
        got = model.branches[0].forward_map(x)
    assert (got - want).abs().max() <= 1e-5
    assert any("head" in n for n in report.notes)


def test_hf_convnext_layout_matches_hf_model():
    transformers = pytest.importorskip("transformers", reason="Hugging Face ConvNext layout check needs transformers")
    torch.manual_seed(0)
    hf = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=DIMS, depths=DEPTHS,
                                                                layer_scale_init_value=0.5)).eval()
    model = PIIPBackbone(PIIPConfig(branches=[cx(64, 0.0)], merge=None, pyramid=None)).eval()
    load_pretrained_branches(model, [{f"convnext.{k}": v for k, v in hf.state_dict().items()}])
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert (model.branches[0].forward_map(x) - hf(x).last_hidden_state).abs().max() <= 1e-5
        # the convnext_b_1024 baseline layout: the four stage maps are HF's hidden_states[1:]
        base = piip.create_model("convnext_b_1024", img_size=96,
                                 branches=[{"stage_dims": DIMS, "stage_depths": DEPTHS}]).eval()
        load_pretrained_branches(base, [hf.state_dict()])
        stages = hf(x, output_hidden_states=True).hidden_states[1:]
        for got, want in zip(base(x).values(), stages):
            assert got.shape == want.shape and (got - want).abs().max() <= 1e-5


def test_bad_inputs_give_one_clear_error():
    model = PIIPBackbone(hybrid("cvc")).eval()
    with pytest.raises(ValueError, match=r"multiples of 32 \(e.g. 128x128\)"):
        model(torch.randn(1, 3, 128, 112))
    with pytest.raises(ValueError, match="ConvNeXt branch needs at least 32 px"):
        model(torch.randn(1, 3, 32, 64))  # the coarsest view would be 16 px high
    with pytest.raises(ValueError, match="4 stage_dims"):
        BranchConfig(img_size=64, kind="convnext", stage_dims=[32, 64], stage_depths=[1, 1])
    with pytest.raises(ValueError, match="out_groups"):
        PIIPBackbone(hybrid("cvc").replace(out_groups=[0, 11]))


# ---------------------------------------------------------------------------- hybrids
@pytest.mark.parametrize("codes", ["cvc", "vcv"])
@pytest.mark.parametrize("size", [(128, 128), (128, 96)])
def test_hybrid_forward_backward_every_parameter_gets_a_gradient(codes, size):
    torch.manual_seed(0)
    model = PIIPBackbone(hybrid(codes)).train()
    out = model(torch.randn(2, 3, *size))
    h, w = size
    assert [tuple(v.shape) for v in out.values()] == [(2, c, h // s, w // s) for c, s in
                                                      zip(model.out_channels, (4, 8, 16, 32))]
    sum(v.float().square().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    # the regular-FPN pyramid: identities on a ConvNeXt finest branch, x4/x2/id/pool on a ViT one
    kinds = [type(getattr(model.pyramid, f"fpn{i}")).__name__ for i in range(1, 5)]
    assert kinds == (["Identity"] * 4 if codes[0] == "c" else ["Sequential", "Sequential", "Identity", "MaxPool2d"])
    assert model.out_channels == ([32, 32, 64, 64] if codes[-1] == "c" else [64] * 4)


def test_regular_fpn_merges_follow_the_official_structure():
    model = PIIPBackbone(hybrid("cvc"))
    assert sorted(model.inter_merges) == ["0", "1", "10"]
    largest = model.merge.projs[2]  # GroupNorm + ReLU only
    assert [type(m).__name__ for m in largest] == ["GroupNorm", "ReLU"]
    assert [type(m).__name__ for m in model.inter_merges["0"].projs[1]] == ["Conv2d", "GroupNorm", "ReLU"]
    assert model.inter_merges["0"].projs[1][0].weight.shape == (32, 64, 3, 3)  # ViT 64 -> ConvNeXt group-0 width


def test_tiny_mask_rcnn_on_a_hybrid_computes_all_losses():
    torch.manual_seed(0)
    heads = DetectorConfig(fpn_channels=32, box_head_dim=64, mask_head_dim=32, rpn_batch_size=64, roi_batch_size=64)
    model = build_detector(hybrid("cvc").replace(image_norm="imagenet"), 3, "mask_rcnn", heads).train()
    assert model.transform.image_mean == [0.485, 0.456, 0.406] and model.transform.image_std == [0.229, 0.224, 0.225]
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 80)]
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    masks2 = torch.zeros(1, 128, 80, dtype=torch.uint8)
    masks2[0, 10:50, 10:70] = 1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks},
               {"boxes": torch.tensor([[10.0, 10.0, 70.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks2}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.branches[0].stem[0].weight.grad is not None


def test_hybrid_layer_decay_reaches_vit_branches_only():
    model = build_detector(hybrid("cvc"), 3, "mask_rcnn", DetectorConfig(fpn_channels=32))
    scales = {n: g["lr_scale"] for g in param_groups(model, 2e-4, 0.05, 0.8) for n in g["param_names"]}
    body = "backbone.body.branches"
    assert scales[f"{body}.0.stages.2.blocks.0.conv_dw.weight"] == 1.0 and scales[f"{body}.2.stem.0.weight"] == 1.0
    assert scales[f"{body}.1.blocks.11.attn.qkv.weight"] == pytest.approx(0.8)        # num_layers = 12 (ViT)
    assert scales[f"{body}.1.patch_embed.proj.weight"] == pytest.approx(0.8 ** 13)
    from piip.zoo import detection_recipe
    name = "piip_ct_vs_vb_1024_672_448"
    assert detection_recipe(name, piip.get_config(name)) == {"lr": 2e-4, "layer_decay": 0.8}


# ---------------------------------------------------------------------------- official checkpoints
_OFFICIAL_OTHER = re.compile(
    r"^backbone\.(interactions\.\d+\.interaction_units_(12|23)\.branch(1to2|2to1)_(proj|injector)\..+"
    r"|intermediate_merging_(0|1|10)_(w[123]|branch[123]\..+)|merge_branch[123]\..+|w[123]|fpn1\.[013]\..+"
    r"|fpn2\.0\..+|branch[123]\.(?!convnext_model\.).+)$")


@pytest.mark.parametrize("codes", ["cvc", "vcv"])
def test_official_hybrid_layout_loads_strictly(tmp_path, codes):
    """Official names written independently: HF ConvNextModel's own keys under branchK.convnext_model.,
    the spec's merge / interaction names for the rest; the HF tensors then drive the loaded branch."""
    transformers = pytest.importorskip("transformers", reason="Hugging Face ConvNext key check needs transformers")
    torch.manual_seed(0)
    src = PIIPBackbone(hybrid(codes)).eval()
    official = to_official_state_dict(src)
    hf_models = {}
    for i, b in enumerate(src.cfg.branches):
        if b.kind != "convnext":
            continue
        k = 3 - i  # official numbering: branch1 = largest
        hf = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=DIMS, depths=DEPTHS,
                                                                    layer_scale_init_value=0.5)).eval()
        prefix = f"backbone.branch{k}.convnext_model."
        ours = {key[len(prefix):] for key in official if key.startswith(prefix)}
        assert ours == {key for key in hf.state_dict() if not key.startswith("layernorm.")}
        official.update({prefix + key: v for key, v in hf.state_dict().items()})  # incl. the unused final LN
        hf_models[i] = hf
    others = [key for key in official if ".convnext_model." not in key]
    assert all(_OFFICIAL_OTHER.match(key) for key in others), [key for key in others if not _OFFICIAL_OTHER.match(key)]
    # the largest branch's merges are GroupNorm only (no conv)
    assert {key for key in others if key.startswith("backbone.merge_branch1.")} == \
        {"backbone.merge_branch1.0.weight", "backbone.merge_branch1.0.bias"}
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "meta": {}}, path)
    dst = PIIPBackbone(hybrid(codes)).eval()
    load_checkpoint(dst, str(path))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for i, hf in hf_models.items():
            assert (dst.branches[i].forward_map(x) - hf(x).last_hidden_state).abs().max() <= 1e-5
    vit = next(i for i, b in enumerate(src.cfg.branches) if b.kind == "vit")
    assert torch.equal(dst.branches[vit].blocks[3].mlp.fc1.weight, src.branches[vit].blocks[3].mlp.fc1.weight)
    assert torch.equal(dst.inter_merges["10"].weights[0], src.inter_merges["10"].weights[0])
    # an unknown key is still refused
    official["backbone.branch1.convnext_model.extra.weight"] = torch.zeros(1)
    torch.save(official, path)
    with pytest.raises(ValueError, match="unexpected key"):
        load_checkpoint(PIIPBackbone(hybrid(codes)), str(path))


# ---------------------------------------------------------------------------- Table II
TABLE_II = {"convnext_b_1024": 321, "piip_ct_cs_cb_1024_672_448": 326, "piip_ct_vs_vb_1024_672_448": 373,
            "piip_ct_cs_vb_1024_672_448": 431, "piip_ct_vs_cb_1024_672_448": 297,
            "piip_vt_cs_vb_1024_672_448": 291, "piip_vt_cs_cb_1024_672_448": 231,
            "piip_vt_vs_cb_1024_672_448": 193, "piip_vt_vs_vb_1024_672_448": 225}


@pytest.mark.parametrize("name", sorted(TABLE_II))
def test_table_ii_flops_within_one_percent(name):
    c = count(name)
    assert abs(c.flops / 1e9 - TABLE_II[name]) <= 0.01 * TABLE_II[name], c.flops / 1e9
    rows = [r.module for r in c.breakdown]
    if name.startswith("piip_"):
        assert [r for r in rows if "after group" in r] == [f"merging (regular_fpn) after group {g}" for g in (0, 1, 10)]
        # the intermediate merges of a ViT-B coarsest branch run a 96 -> 768 conv on the stride-4 grid
        inter = sum(r.flops for r in c.breakdown if "after group" in r.module) / 1e9
        assert (inter > 80) == (name.endswith(("ct_vs_vb_1024_672_448", "ct_cs_vb_1024_672_448")))


def test_drop_path_is_linear_over_the_blocks_not_the_downsampling_layers():
    model = PIIPBackbone(PIIPConfig(branches=[cx(64, drop_path=0.3)], merge=None, pyramid=None))
    stages = model.branches[0].stages
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for stage in stages for blk in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, sum(DEPTHS)).tolist())
