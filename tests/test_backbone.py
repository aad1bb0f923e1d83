import math

import pytest
import torch

import piip
from piip.layers.attention import Attention
from conftest import tiny_input_size, tiny_overrides

# The Table V flavour variants share piip_sbl_1568_1120_672's structure; each one runs end to end
# (at depth 2) in test_official_layouts.py::test_official_file_round_trip_per_flavour.
_FLAVOUR_VARIANTS = ("_augreg", "_augreg_speedup", "_beitv2", "_dinov2", "_mae", "_uniperceiver")
DENSE = [n for n in piip.list_models() if piip.get_config(n).task == "dense" and not n.endswith(_FLAVOUR_VARIANTS)]
CLS = [n for n in piip.list_models() if piip.get_config(n).task == "classification"]

EXPECTED = {
    "piip_tsb_1120_896_448": (1120, 896, 448), "piip_tsb_1568_896_448": (1568, 896, 448),
    "piip_tsb_1568_1120_672": (1568, 1120, 672), "piip_sbl_1120_672_448": (1120, 672, 448),
    "piip_sbl_1344_896_448": (1344, 896, 448), "piip_sbl_1568_896_672": (1568, 896, 672),
    "piip_tsbl_1344_896_672_448": (1344, 896, 672, 448), "piip_tsbl_1568_1120_672_448": (1568, 1120, 672, 448),
    "piip_tsbl_1792_1568_1120_448": (1792, 1568, 1120, 448), "vitdet_b_1024": (1024,), "vitdet_l_1024": (1024,),
    "piip_tsb_368_192_128_cls": (368, 192, 128), "piip_sbl_320_160_96_cls": (320, 160, 96),
    "piip_sbl_384_192_128_cls": (384, 192, 128), "piip_b_512_256_128_cls": (512, 256, 128),
    "deit_b_224_cls": (224,), "vit_l_224_cls": (224,),
}


def test_registry_has_every_paper_configuration():
    assert set(EXPECTED) <= set(piip.list_models())
    for name, res in EXPECTED.items():
        assert tuple(b.img_size for b in piip.get_config(name).branches) == res, name
    # finest resolution first = smallest model first
    widths = [b.embed_dim for b in piip.get_config("piip_tsbl_1344_896_672_448").branches]
    assert widths == sorted(widths) == [192, 384, 768, 1024]


def test_released_hyper_parameters():
    tsb = piip.get_config("piip_tsb_1120_896_448")
    assert (tsb.deform_num_heads, tsb.n_points, tsb.deform_ratio, tsb.cffn_ratio) == (16, 4, 0.5, 0.25)
    assert tsb.interaction_drop_path == 0.4 and tsb.merge == "conv"
    assert [b.drop_path for b in tsb.branches] == [0.05, 0.05, 0.15]
    assert all(ws == [14] * 12 for ws in (b.window_sizes for b in tsb.branches))
    sbl = piip.get_config("piip_sbl_1344_896_448")
    assert sbl.branches[2].interaction_groups[:2] == [[0, 1], [2, 3]]
    assert all(ws == [28] * b.depth for b, ws in ((b, b.window_sizes) for b in sbl.branches))
    vitdet = piip.get_config("vitdet_b_1024").branches[0]
    assert [i for i, w in enumerate(vitdet.window_sizes) if w == 0] == [2, 5, 8, 11]


def test_unknown_model_and_override_errors():
    with pytest.raises(ValueError, match="did you mean"):
        piip.create_model("piip_tsb_1120_896_44")
    with pytest.raises(ValueError, match="unknown model overrides"):
        piip.get_config("piip_tsb_1120_896_448", not_a_field=1)
    with pytest.raises(ValueError, match="unknown branch overrides"):
        piip.get_config("piip_tsb_1120_896_448", branches={"width": 3})


@pytest.mark.parametrize("name", DENSE)
def test_dense_models_build_and_output_pyramid(name):
    h, w = tiny_input_size(name)
    model = piip.create_model(name, **tiny_overrides(name, img_size=h)).eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = model(x)
    levels = model.cfg.pyramid_levels or [0, 1, 2, 3]  # DINO backbones: strides 8/16/32 only
    assert list(out) == [str(lv) for lv in levels] and model.out_strides == [4, 8, 16, 32]
    assert len(model.out_channels) == 4  # per level, indexed by level number
    for lv in levels:
        stride = (4, 8, 16, 32)[lv]
        assert out[str(lv)].shape == (2, model.out_channels[lv], h // stride, w // stride), (lv, out[str(lv)].shape)
    s = model.branches[0].group_strides[-1]  # the final merged map is on the finest branch's last grid
    assert model.forward_features(x).shape == (2, model.out_channels[-1], h // s, w // s)


@pytest.mark.parametrize("name", CLS)
def test_classification_models(name):
    model = piip.create_model(name, **tiny_overrides(name, img_size=64)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def _tiny(name="piip_tsb_1120_896_448", **kw):
    return piip.create_model(name, **{**tiny_overrides(name), **kw})


def _set_gammas(model, value=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(value)


def _perturb_zero_init(model):
    """Released init zeroes the gammas and the deformable offset/weight projections, which makes
    some gradients exactly zero at step 0; move them off zero so every path is exercised."""
    _set_gammas(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 0.02)


@pytest.mark.parametrize("name", ["piip_tsb_1120_896_448", "piip_tsbl_1344_896_672_448", "piip_b_512_256_128_cls",
                                  "piip_tsb_368_192_128_cls"])
def test_gradients_reach_every_parameter(name):
    model = _tiny(name, img_size=96)
    _perturb_zero_init(model)
    model.eval()  # no stochastic depth: a dropped path legitimately gets no gradient
    size = 96
    out = model(torch.randn(2, 3, size, size))
    loss = sum(o.float().square().mean() for o in out.values()) if isinstance(out, dict) else out.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_interactions_connect_coarsest_to_finest():
    model = _tiny().eval()
    _set_gammas(model)
    x = torch.randn(1, 3, 64, 64)
    views = model.resize_inputs(x)
    changed = list(views)
    changed[-1] = views[-1] + torch.randn_like(views[-1])
    with torch.no_grad():
        a = model.forward_views(views)
        b = model.forward_views(changed)
    assert not torch.allclose(a[0].x, b[0].x), "finest branch ignores the coarsest branch"
    # with the released zero-initialised gammas the branches start independent
    fresh = _tiny().eval()
    with torch.no_grad():
        a = fresh.forward_views(views)
        b = fresh.forward_views(changed)
    torch.testing.assert_close(a[0].x, b[0].x)


def test_interaction_edges_control_information_flow():
    # only fine -> coarse edges (1 -> 2, 0 -> 1): the finest branch cannot see anything else
    model = _tiny(edges=[[0, 1], [1, 2]]).eval()
    _set_gammas(model)
    assert set(model.interactions[0].edges) == {"0to1", "1to2"}
    views = model.resize_inputs(torch.randn(1, 3, 64, 64))
    changed = views[:2] + [views[2] + 1.0]
    with torch.no_grad():
        a, b = model.forward_views(views), model.forward_views(changed)
    torch.testing.assert_close(a[0].x, b[0].x)
    assert not torch.allclose(a[2].x, b[2].x)
    with pytest.raises(ValueError, match="interaction edge"):
        _tiny(edges=[[0, 3]])


def test_regular_cross_attention_ablation():
    model = _tiny(attn_type="normal").eval()
    _set_gammas(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["2"].shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="attn_type"):
        _tiny(attn_type="sparse")


def test_window_covering_grid_equals_global_attention():
    torch.manual_seed(1)
    glob = Attention(32, 4, window_size=0)
    win = Attention(32, 4, window_size=6)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 6 * 6, 32)
    torch.testing.assert_close(win(x, (6, 6)), glob(x, (6, 6)), rtol=1e-5, atol=1e-6)
    # a smaller window really restricts attention
    small = Attention(32, 4, window_size=3)
    small.load_state_dict(glob.state_dict())
    assert not torch.allclose(small(x, (6, 6)), glob(x, (6, 6)), atol=1e-4)


def test_window_attention_pads_normed_tokens_with_zeros():
    """Padding happens before qkv (released code): a 5x5 grid in 4x4 windows equals attention
    over each window's real tokens plus zero tokens."""
    torch.manual_seed(2)
    attn = Attention(8, 2, window_size=4)
    x = torch.randn(1, 25, 8)
    out = attn(x, (5, 5))
    grid = torch.zeros(1, 8, 8, 8)
    grid[:, :5, :5] = x.view(1, 5, 5, 8)
    ref = Attention(8, 2, window_size=0)
    ref.load_state_dict(attn.state_dict())
    window = grid[:, 4:8, 4:8].reshape(1, 16, 8)  # bottom-right window holds only token (4, 4)
    expected = ref(window, (4, 4)).view(1, 4, 4, 8)[:, 0, 0]
    torch.testing.assert_close(out.view(1, 5, 5, 8)[:, 4, 4], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (48, 96), (112, 48)])
def test_non_square_inputs(size):
    model = _tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out["2"].shape[-2:] == (size[0] // 16, size[1] // 16)


def test_eval_is_deterministic():
    model = _tiny().eval()
    _set_gammas(model)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a, b = model(x), model(x)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_batch_elements_are_independent():
    model = _tiny().eval()
    _set_gammas(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_features(x)
        one = model.forward_features(x[1:2])
    torch.testing.assert_close(full[1:2], one, rtol=1e-3, atol=1e-3)


def test_resolution_ratios_follow_registered_sizes():
    model = _tiny(img_size=560)
    views = model.resize_inputs(torch.randn(1, 3, 560, 560))
    assert [v.shape[-1] for v in views] == [560, 448, 224]
    views = model.resize_inputs(torch.randn(1, 3, 1120, 672))
    assert [tuple(v.shape[-2:]) for v in views] == [(1120, 672), (896, 537), (448, 268)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    model = _tiny().eval().to(dtype)
    _set_gammas(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert all(o.dtype == dtype and torch.isfinite(o.float()).all() for o in out.values())


def test_bf16_autocast():
    model = _tiny().eval()
    _set_gammas(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(o.float()).all() for o in out.values())


def test_bad_inputs_raise_specific_errors():
    model = _tiny().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 64, 64\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="floating-point.*torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"branch 0 .*70x64.*multiples of 16.*80x64"):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"branch 2 .*smaller than one patch"):
        model(torch.randn(1, 3, 32, 32))  # the 0.4x view is 12 px, less than a 16 px patch
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_linear_merge_override_and_single_branch_features():
    model = _tiny(merge="linear").eval()
    assert model.merge.kind == "linear"
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 96, 4, 4)
    vitdet = piip.create_model("vitdet_b_1024", img_size=64, branches={"embed_dim": 64, "num_heads": 2}).eval()
    with torch.no_grad():
        feats = vitdet.forward_features(torch.randn(1, 3, 64, 64))
        tokens = vitdet.branches[0].forward_tokens(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 64, 4, 4) and tokens.x.shape == (1, 16, 64)


def test_pos_embed_resized_bicubic_from_pretraining_grid():
    model = _tiny().eval()
    br = model.branches[0]
    assert br.pos_embed.shape == (1, 14 * 14, 32)
    table = br.pos_embed_for((4, 6))
    grid = br.pos_embed.reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(table, want.flatten(2).transpose(1, 2))
    # cached result follows parameter updates
    with torch.no_grad():
        br.pos_embed.add_(1.0)
        torch.testing.assert_close(br.pos_embed_for((4, 6)), table + 1.0, rtol=1e-5, atol=1e-5)
