"""Branches by size letter, shared by every model family of the zoo: DeiT-size ViTs (T/S/B/L/H) and
timm / Hugging Face ConvNeXts (T/S/B/L), with the released drop-path rates."""
from __future__ import annotations

from typing import Optional

from ..branches.flavours import flavour_settings
from ..config import BranchConfig, convnext_groups, stage_groups, uniform_groups, windows

# width, depth, heads of the DeiT sizes
VIT_SIZES = {"T": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "H": (1280, 32, 16)}
# released detection drop-path rates (constant per block)
DET_DROP_PATH = {"T": 0.05, "S": 0.05, "B": 0.15, "L": 0.4, "H": 0.5}


def vit(size: str, img_size: float, groups: int = 12, window: int = 0, drop_path: float = 0.0,
        cls_token: bool = False, pos_grid: Optional[int] = 14, layer_scale: Optional[float] = 1.0,
        global_every: Optional[int] = None, flavour: str = "deit", **settings) -> BranchConfig:
    """A ViT-``size`` branch of pretraining ``flavour``; ``settings`` override the flavour's fields."""
    dim, depth, heads = VIT_SIZES[size]
    return BranchConfig(img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads, drop_path=drop_path,
                        cls_token=cls_token, pos_grid=pos_grid, layer_scale=layer_scale,
                        window_sizes=windows(depth, window, global_every) if window else [0] * depth,
                        interaction_groups=uniform_groups(depth, groups),
                        **{**flavour_settings(flavour), **settings})


# stage widths and depths of timm / Hugging Face ConvNeXt (FB ImageNet releases)
CONVNEXT_SIZES = {"T": ([96, 192, 384, 768], [3, 3, 9, 3]), "S": ([96, 192, 384, 768], [3, 3, 27, 3]),
                  "B": ([128, 256, 512, 1024], [3, 3, 27, 3]), "L": ([192, 384, 768, 1536], [3, 3, 27, 3])}
# released hybrid drop-path rates (linear schedule over the blocks, last block's rate)
CONVNEXT_DROP_PATH = {"T": 0.3, "S": 0.3, "B": 0.4, "L": 0.5}


def convnext(size: str, img_size: float, drop_path: float = 0.0, groups: str = "released") -> BranchConfig:
    """A ConvNeXt branch; ``groups`` 'released' = the 12 hybrid interaction groups, 'stages' = one per stage."""
    dims, depths = CONVNEXT_SIZES[size]
    cut = convnext_groups(depths) if groups == "released" else stage_groups(depths)
    return BranchConfig(img_size=img_size, kind="convnext", stage_dims=list(dims), stage_depths=list(depths),
                        layer_scale=1e-6, drop_path=drop_path, interaction_groups=cut, pos_grid=None)
