"""PIIP-LLaVA vision towers: registry, interaction cuts, and the paper's vision-encoder FLOPs (llava_spec §6.2)."""
from __future__ import annotations

import pytest
import torch

from piip import get_config, list_models
from piip.backbone import PIIPBackbone
from piip.complexity import count
from piip.zoo.llava import convnext_llava_groups, llava_tower, tower_interactions

# README / paper Table: vision-encoder FLOPs (G) of each tower
QUOTED = {"llava15_clip_l_336": 191, "piip_llava_clip_bl_512_256": 193, "piip_llava_convnext_b_clip_l_640_224": 191,
          "piip_llava_clip_bl_512_448": 422, "piip_llava_convnext_b_clip_l_1024_336": 598,
          "piip_llava_convnext_l_clip_l_1024_336": 1037}


# llava_spec §6.2: an independent analytic re-count of the official counter's rules
RECOUNT = {"llava15_clip_l_336": 191.0, "piip_llava_clip_bl_512_256": 193.5,
           "piip_llava_convnext_b_clip_l_640_224": 191.3, "piip_llava_clip_bl_512_448": 422.6,
           "piip_llava_convnext_b_clip_l_1024_336": 598.2, "piip_llava_convnext_l_clip_l_1024_336": 1037.7}


@pytest.mark.parametrize("name", sorted(QUOTED))
def test_llava_tower_flops_match_the_paper(name):
    got = count(name).flops / 1e9
    assert abs(got / QUOTED[name] - 1) < 0.01, (name, got)
    assert abs(got - RECOUNT[name]) < 0.1, (name, got)


def test_llava_24_interaction_towers_cost_more_than_quoted():
    # the 13B ConvNeXt configs have 24 interactions: same counter gives 732.0G / 1213.7G (llava_spec §6.3)
    assert round(count("piip_llava_convnext_b_clip_l_1024_336_i24").flops / 1e9, 1) == 732.0
    assert round(count("piip_llava_convnext_l_clip_l_1024_336_i24").flops / 1e9, 1) == 1213.7


def test_llava_tower_registry_and_cuts():
    names = list_models("piip_llava_*")
    assert {"piip_llava_clip_bl_512_256", "piip_llava_clip_bl_512_448", "piip_llava_convnext_b_clip_l_640_224",
            "piip_llava_convnext_b_clip_l_1024_336", "piip_llava_convnext_l_clip_l_1024_336"} <= set(names)
    cfg = get_config("piip_llava_convnext_b_clip_l_1024_336")
    assert cfg.task == "features" and cfg.merge is None and tower_interactions(cfg) == 12
    assert [b.kind for b in cfg.branches] == ["convnext", "vit"] and cfg.branches[1].pos_grid == 21
    g24 = convnext_llava_groups(24)
    assert g24[:8] == [[0, 1], [2, 2], [3, 4], [5, 6], [7, 9], [10, 10], [11, 12], [13, 13]]
    assert g24[-4:] == [[32, 33], [34, 34], [35, 36], [37, 38]] and len(g24) == 24
    assert llava_tower("convnext_l_clip_l_1024_336", 24).branches[1].interaction_groups == [[i, i] for i in range(24)]
    with pytest.raises(ValueError, match="released with 2 interactions"):
        llava_tower("clip_bl_512_256", 12)
    with pytest.raises(ValueError, match="unknown PIIP-LLaVA tower"):
        llava_tower("clip_bl_9")


def test_features_tower_runs_tiny_and_returns_both_branches():
    torch.manual_seed(0)
    cfg = get_config("piip_llava_clip_bl_512_256").replace(
        img_size=64, branches=[{"embed_dim": 32, "num_heads": 2}, {"embed_dim": 48, "num_heads": 4}])
    cfg = cfg.replace(deform_num_heads=4)
    model = PIIPBackbone(cfg).eval()
    with torch.no_grad():
        fine, coarse = model.forward_branches(torch.randn(1, 3, 64, 64))
    assert fine.x.shape == (1, 16, 32) and coarse.x.shape == (1, 4, 48) and fine.hw == (4, 4)
    assert fine.cls is not None and torch.isfinite(fine.x).all()
