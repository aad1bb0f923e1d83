"""ADE20K UperNet configurations of the paper's segmentation table (``vision_spec`` §E.3).

No config of these models was released: the settings are inferred so that ``piip flops``
reproduces the paper's backbone FLOPs (PIIP-TSB 118G, PIIP-SBL 456G, ViT-B 159G, ViT-L 545G):
window 28 attention where a branch's grid exceeds 28 tokens (the 448 px branch's 28x28 grid is one
window, i.e. global) and global attention in the 21x21 coarsest branch; the ViT baselines use
window 28 in all blocks. The UperNet widths and optimiser settings are those of the ViT-Adapter
B / L UperNet recipes the released code derives from.

Each name registers a backbone config (as every model) plus a ``piip.zoo.recipes.SEG_RECIPES`` entry
holding the segmentor and optimiser defaults ``piip train segmentation`` uses for it; a new family
(e.g. the released InternViT-6B configs) drops in with one ``register_segmentation_model`` call.
"""
from __future__ import annotations

from ..config import PIIPConfig
from .builders import DET_DROP_PATH, vit
from .recipes import RECIPE_B, RECIPE_L, register_segmentation_model


def _piip(sizes: str, resolutions: tuple[int, int, int]) -> PIIPConfig:
    branches = [vit(s, r, window=28 if r / 16 > 28 else 0, drop_path=DET_DROP_PATH[s])
                for s, r in zip(sizes, resolutions)]
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn")


def _vit(size: str, res: int) -> PIIPConfig:
    return PIIPConfig(branches=[vit(size, res, groups=1, window=28, drop_path=DET_DROP_PATH[size])],
                      merge=None, pyramid="ln")


register_segmentation_model(
    "piip_tsb_896_448_336_seg", "PIIP-TSB 896/448/336 UperNet ADE20K backbone (paper 118G; settings inferred)",
    lambda: _piip("TSB", (896, 448, 336)), RECIPE_B)
register_segmentation_model(
    "piip_sbl_1120_448_336_seg", "PIIP-SBL 1120/448/336 UperNet ADE20K backbone (paper 456G; settings inferred)",
    lambda: _piip("SBL", (1120, 448, 336)), RECIPE_L)
register_segmentation_model(
    "vit_b_640_seg", "ViT-B 640 UperNet ADE20K baseline (paper 159G; window 28, settings inferred)",
    lambda: _vit("B", 640), RECIPE_B)
register_segmentation_model(
    "vit_l_640_seg", "ViT-L 640 UperNet ADE20K baseline (paper 545G; window 28, settings inferred)",
    lambda: _vit("L", 640), RECIPE_L)
