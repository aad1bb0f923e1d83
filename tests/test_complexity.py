"""Counting rules of piip.complexity, checked against torch's FlopCounterMode on real (tiny) forwards,
and the papers' tables reproduced from the registered configurations."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import piip
from piip.cli import main
from piip.complexity import (Geom, ModuleCost, _walk, attention_flops, count, count_model,
                             deform_attention_flops, module_flops)
from piip.layers.attention import Attention
from piip.layers.deform_attn import MSDeformAttn
from piip.layers.interaction import deform_inputs


def matmul_macs(fn) -> int:
    """Multiply-accumulates of the matrix products and convolutions ``fn`` runs (FlopCounterMode
    counts 2 FLOPs per MAC; the math SDPA path exposes the attention products as bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    total = fc.get_total_flops()
    assert total % 2 == 0
    return total // 2


def walked(module: nn.Module, geom: Geom, overrides=None) -> ModuleCost:
    cost = ModuleCost("t")
    _walk(module, geom, cost, overrides)
    return cost


def test_linear_rule():
    fc = nn.Linear(48, 80)
    assert module_flops(fc, Geom(37, (1, 37))) == ("linear", 37 * 48 * 80)
    assert walked(fc, Geom(37, (1, 37))).flops == matmul_macs(lambda: fc(torch.randn(1, 37, 48)))


def test_conv_rules():
    patch = nn.Conv2d(3, 32, 16, 16)
    kind, n = module_flops(patch, Geom(0, (64, 48)))
    assert kind == "conv" and n == 4 * 3 * (16 * 16 * 3 * 32) + 32 * 4 * 3  # MACs + bias adds (mmcv)
    assert n - 32 * 12 == matmul_macs(lambda: patch(torch.randn(1, 3, 64, 48)))
    dw = nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False)
    assert module_flops(dw, Geom(0, (5, 7))) == ("conv", 35 * 9 * 24)
    assert module_flops(dw, Geom(0, (5, 7)))[1] == matmul_macs(lambda: dw(torch.randn(1, 24, 5, 7)))
    up = nn.ConvTranspose2d(32, 32, 2, 2, bias=False)
    assert module_flops(up, Geom(0, (4, 4)))[1] == matmul_macs(lambda: up(torch.randn(1, 32, 4, 4)))


def test_norm_rules():
    assert module_flops(nn.LayerNorm(16), Geom(10, (2, 5))) == ("norm", 2 * 10 * 16)
    assert module_flops(nn.LayerNorm(16, elementwise_affine=False), Geom(10, (2, 5))) == ("norm", 10 * 16)
    assert module_flops(nn.GroupNorm(4, 16), Geom(10, (2, 5))) == ("norm", 2 * 10 * 16)
    assert module_flops(nn.GELU(), Geom(10, (2, 5))) is None
    assert module_flops(nn.ReLU(), Geom(10, (2, 5)), width=16) == ("act", 10 * 16)
    assert module_flops(nn.MaxPool2d(2, 2), Geom(10, (2, 5)), width=16) == ("pool", 10 * 16)
    with pytest.raises(ValueError, match="width"):
        module_flops(nn.ReLU(), Geom(10, (2, 5)))


@pytest.mark.parametrize("window,grid", [(0, (7, 7)), (4, (8, 12))])
def test_attention_rule(window, grid):
    """Global and windowed self-attention: linears + 2·N·M·d, equal to the real forward's MACs
    (grids that are a multiple of the window, so the real forward does no padding)."""
    attn = Attention(64, 4, window_size=window)
    n = grid[0] * grid[1]
    cost = walked(attn, Geom(n, grid))
    assert cost.flops_by_kind["attention"] == attention_flops(n, 64, window) == 2 * n * (window ** 2 or n) * 64
    assert cost.flops_by_kind["linear"] == n * 64 * 256
    assert cost.flops == matmul_macs(lambda: attn(torch.randn(1, n, 64), grid))


def test_deformable_attention_rule():
    """Deformable attention: its four linears (value_proj on the feature tokens) + 5·N·K·d."""
    m = MSDeformAttn(64, num_heads=4, num_points=4, ratio=0.5, dim_feat=32)
    q_hw, f_hw = (8, 8), (4, 4)
    nq, nf = 64, 16
    cost = walked(m, Geom(nq, q_hw), {id(m.value_proj): Geom(nf, f_hw)})
    assert cost.flops_by_kind["deform"] == deform_attention_flops(nq, 64, 4) == 5 * nq * 4 * 64
    linear = nq * 64 * (4 * 4 * 2) + nq * 64 * (4 * 4) + nf * 32 * 32 + nq * 32 * 64
    assert cost.flops_by_kind["linear"] == linear
    ref, shapes, start = deform_inputs(q_hw, f_hw, torch.device("cpu"))
    assert linear == matmul_macs(lambda: m(torch.randn(1, nq, 64), ref, torch.randn(1, nf, 32), shapes, start))


def _macs_and_conv_bias_adds(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """One real forward: its matmul/conv MACs and the bias additions of its convolutions (mmcv
    counts those, FlopCounterMode does not)."""
    bias = 0

    def hook(mod, inp, out):
        nonlocal bias
        bias += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None]
    macs = matmul_macs(lambda: model(x))
    for h in hs:
        h.remove()
    return macs, bias


TINY = {"embed_dim": 32, "num_heads": 2, "depth": 3}


@pytest.mark.parametrize("name,kw,size", [
    # window 14 on 8x8 / 6x6 / 3x3 grids: the real forward pads every window
    ("piip_tsb_1120_896_448", dict(branches=TINY, deform_num_heads=2), 128),
    ("vitdet_b_1024", dict(branches=TINY), 224),
    # DINO backbone: pyramid levels 1-3 only (fpn1 held, not run), windows 24 + global blocks
    ("piip_sbl_1792_1120_672_dino", dict(branches=TINY, deform_num_heads=2), 128),
    # BEiT relative-position windows, q/v biases, identity-norm interactions, tanh-GELU branches
    ("piip_sbl_1568_1120_672_beitv2", dict(branches={**TINY, "window_sizes": [4, 4, 4]}, deform_num_heads=2), 96),
    ("piip_sbl_1568_1120_672_augreg_speedup", dict(branches=TINY, deform_num_heads=2), 96),
    ("piip_tsb_368_192_128_cls", dict(branches=TINY, deform_num_heads=2, num_classes=10), 128),
    ("piip_b_512_256_128_cls", dict(branches=TINY, deform_num_heads=2, attn_type="normal", num_classes=10), 128),
])
def test_whole_model_matches_real_forward(name, kw, size):
    """Every matrix product and convolution of a real forward of a tiny model (branches,
    interactions, merging, pyramid or heads) is counted exactly by the as-built count."""
    torch.manual_seed(0)
    model = piip.create_model(name, img_size=size, **kw).eval()
    c = count_model(model, name)
    macs, bias = _macs_and_conv_bias_adds(model, torch.randn(1, 3, size, size))
    kinds: dict[str, int] = {}
    for r in c.built_breakdown:
        for k, v in r.flops_by_kind.items():
            kinds[k] = kinds.get(k, 0) + v
    assert kinds["linear"] + kinds["conv"] + kinds["attention"] - bias == macs
    assert c.built_params == sum(p.numel() for p in model.parameters())
    multi = len(getattr(model, "backbone", model).branches) > 1
    assert (kinds["deform"] > 0) == (multi and kw.get("attn_type", "deform") == "deform")


def test_paper_convention_adjustments():
    """Position tables at the branch grid, linear merging whatever the model is built with, and the
    papers' counter's 1000-class LayerNorm + Linear head on the widest width (vision_spec §0.4)."""
    c = count("piip_tsb_1120_896_448")
    t = c.part("branch 0", built=True)
    assert c.part("branch 0").params - t.params == (70 * 70 - 14 * 14) * 192
    merge, head = c.breakdown[-2], c.breakdown[-1]
    assert merge.module == "merging (linear)" and c.built_breakdown[-2].module == "merging (conv)"
    # LN+Linear+LN for the 192- and 384-wide branches, LN for the 768-wide one, and 3 merge weights
    lin = lambda a, b: 2 * a + a * b + b + 2 * b  # noqa: E731
    assert merge.params == lin(192, 768) + lin(384, 768) + 2 * 768 + 3
    assert head.module == "classification head (paper counter)" and head.params == 2 * 768 + 768 * 1000 + 1000
    # LayerNorm over the finest grid's tokens, Linear on the pooled vector
    assert head.flops == 2 * 70 * 70 * 768 + 768 * 1000
    assert c.built_params - c.params == sum(r.params for r in c.built_breakdown[-2:]) - merge.params - head.params \
        - sum((g[0] * g[1] - 196) * d for g, d in zip(c.grids, (192, 384, 768)))
    # classifiers count their own heads instead
    assert not any(r.module.endswith("(paper counter)") for r in count("piip_tsb_368_192_128_cls").breakdown)
    # so do the regular-FPN models of Table II, which come from the detection counter (no head)
    for name in ("piip_ct_vs_vb_1024_672_448", "convnext_b_1024"):
        assert not any(r.module.endswith("(paper counter)") for r in count(name).breakdown), name


# Paper rows: /work/shared/reference/paper_tables.md (Table I, ImageNet table). #Param in M, #FLOPs in G.
PAPER_ROWS = {
    "vitdet_b_1024": (90, 463), "vitdet_l_1024": (308, 1542),
    "piip_tsb_1120_896_448": (146, 243), "piip_tsb_1568_896_448": (147, 287),
    "piip_tsb_1568_1120_672": (149, 453),
    "piip_sbl_1120_672_448": (493, 727), "piip_sbl_1344_896_448": (495, 1002),
    "piip_sbl_1568_896_672": (497, 1464),
    "piip_tsbl_1344_896_672_448": (506, 755), "piip_tsbl_1568_1120_672_448": (507, 861),
    "piip_tsbl_1792_1568_1120_448": (512, 1535),
    "deit_b_224_cls": (None, 17.2), "vit_l_224_cls": (None, 61.6),
    "piip_tsb_368_192_128_cls": (144, 17.4), "piip_sbl_320_160_96_cls": (489, 39.0),
    "piip_sbl_384_192_128_cls": (489, 61.2),
    # README "Faster Training" rows (#Param); their FLOPs (1874G / 1741G) include zero-padded qkv
    # windows (vision_spec §B.3), checked in test_table_v_faster_training_flops
    "piip_sbl_1568_1120_672_augreg": (498, None), "piip_sbl_1568_1120_672_augreg_speedup": (470, None),
}


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_paper_tables(name):
    params_m, flops_g = PAPER_ROWS[name]
    c = count(name)
    if params_m is not None:
        assert c.params / 1e6 == pytest.approx(params_m, rel=0.01)
    if flops_g is not None:
        assert c.flops / 1e9 == pytest.approx(flops_g, rel=0.03)


def test_table_v_faster_training_flops():
    """README AugReg SBL 1874G and its speedup 1741G: the paper rule plus the qkv projections the
    InternViT-class branches run on zero-padded windows (only the qkv term differs)."""
    for name, quoted in (("piip_sbl_1568_1120_672_augreg", 1874), ("piip_sbl_1568_1120_672_augreg_speedup", 1741)):
        c = count(name)
        padded_qkv = 0
        for br, (h, w) in zip(piip.get_config(name).branches, c.grids):
            ws, d = br.window_sizes[0], br.embed_dim
            padded = (-(-h // ws) * ws) * (-(-w // ws) * ws)
            padded_qkv += br.depth * (padded - h * w) * d * 3 * d
        assert (c.flops + padded_qkv) / 1e9 == pytest.approx(quoted, rel=0.005)


# Table X (PIIP-B from scratch, 512/256/128): module -> (#Param M, #FLOPs G). Its FLOPs are only
# reproduced if the 512 px branch attends inside 16x16 windows (1024 tokens in 4 windows), which is
# how it is registered; with global attention that branch costs 7.9G instead of 4.9G.
TABLE_X = {"branch 2": (59.6, 3.8), "branch 1": (15.1, 4.3), "branch 0": (4.0, 4.9),
           "interactions": (21.2, 5.1), "merging": (0.3, 0.2)}
TABLE_X_FINEST_WINDOW = 16


def test_table_x_per_module():
    registered = count("piip_b_512_256_128_cls")
    assert piip.get_config("piip_b_512_256_128_cls").branches[0].window_sizes == [TABLE_X_FINEST_WINDOW] * 12
    global_attn = count("piip_b_512_256_128_cls", branches=[{"window_sizes": [0] * 12}, {}, {}])
    for module, (p, f) in TABLE_X.items():
        assert registered.part(module).params / 1e6 == pytest.approx(p, abs=0.05), module
        assert registered.part(module).flops / 1e9 == pytest.approx(f, rel=0.03, abs=0.05), module
    assert global_attn.part("branch 0").flops / 1e9 == pytest.approx(7.94, rel=0.01)
    backbone = registered.flops - registered.part("classification heads").flops
    assert backbone / 1e9 == pytest.approx(18.4, rel=0.03)
    assert registered.params / 1e6 == pytest.approx(100, rel=0.02)


def test_img_size_and_errors():
    c = count("piip_tsb_1120_896_448", img_size=[560])
    assert c.grids == [(35, 35), (28, 28), (14, 14)]
    c2 = count("piip_tsb_1120_896_448", img_size=[1120, 640, 320])
    assert c2.grids == [(70, 70), (40, 40), (20, 20)]
    with pytest.raises(ValueError, match="img_size"):
        count("piip_tsb_1120_896_448", img_size=[1000])
    with pytest.raises(ValueError, match="one per branch"):
        count("piip_tsb_1120_896_448", img_size=[1120, 896])


def test_cli_json_and_table(capsys):
    assert main(["flops", "vitdet_b_1024", "piip_tsb_1120_896_448", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["vitdet_b_1024", "piip_tsb_1120_896_448"]
    for r in rows:
        assert isinstance(r["params"], int) and isinstance(r["flops"], int)
        assert r["params"] == sum(b["params"] for b in r["breakdown"])
        assert r["flops"] == sum(b["flops"] for b in r["breakdown"])
        assert r["as_built"]["params"] >= r["params"] - 10_000_000
    assert main(["flops", "piip_tsb_1120*"]) == 0
    out = capsys.readouterr().out
    assert "piip_tsb_1120_896_448" in out and "merging (conv)" in out and "interactions" in out
    assert main(["flops", "nope"]) == 2
