"""PIIP-LLaVA vision towers (llava_spec §1.2): the released two-branch configurations.

Branches are finest first as everywhere in piip: branch 0 is the small model at the high
resolution (CLIP-B/16 or ConvNeXt-B/L), branch 1 is CLIP-L/16 at the low one (the official
code's ``branch2`` / ``branch1``). The towers are ``task="features"``: no merging, no pyramid;
the LLaVA projector reads both branches' final tokens. The interaction count is part of the
configuration (:func:`llava_tower`); the 13B ConvNeXt checkpoints use 24, the 7B ones 12, so a
loader reads it from the checkpoint (``interactions.<g>`` keys) rather than from a name.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..branches.flavours import flavour_settings
from ..config import BranchConfig, PIIPConfig, convnext_groups
from ..registry import register_model
from .builders import CONVNEXT_SIZES, VIT_SIZES, convnext

# variant -> (fine branch 'clip_b' | 'convnext_b' | 'convnext_l', fine px, CLIP-L px, CLIP-L stored grid,
#             allowed interaction counts (first = default))
LLAVA_TOWERS: dict[str, tuple[str, int, int, int, tuple[int, ...]]] = {
    "clip_bl_512_256": ("clip_b", 512, 256, 14, (2,)),
    "clip_bl_512_448": ("clip_b", 512, 448, 21, (12,)),
    "convnext_b_clip_l_640_224": ("convnext_b", 640, 224, 14, (2,)),
    "convnext_b_clip_l_1024_336": ("convnext_b", 1024, 336, 21, (12, 24)),
    "convnext_l_clip_l_1024_336": ("convnext_l", 1024, 336, 21, (12, 24)),
}


def clip_branch(size: str, img_size: float, groups: list[list[int]], pos_grid: int, patch_size: int = 16) -> BranchConfig:
    """A CLIP ViT-``size`` branch (bias-free patch conv, ln_pre, quick-GELU, class token)."""
    dim, depth, heads = VIT_SIZES[size]
    return BranchConfig(img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch_size,
                        pos_grid=pos_grid, interaction_groups=groups, **flavour_settings("clip"))


def _split(groups: list[list[int]], firsts: list[int]) -> list[list[int]]:
    """Halve every [a, b] range: the first half has ``firsts[i]`` layers."""
    out = []
    for (a, b), n in zip(groups, firsts):
        out += [[a, a + n - 1], [a + n, b]]
    return out


def convnext_llava_groups(num: int) -> list[list[int]]:
    """The released cuts of the 39-layer ConvNeXt-B/L list: 2, 12 or 24 interaction groups."""
    if num == 2:
        return [[0, 19], [20, 38]]
    twelve = convnext_groups(CONVNEXT_SIZES["B"][1])
    if num == 12:
        return twelve
    # the 13B configs: [0-1],[2],[3-4],[5-6],[7-9],[10],[11-12],[13],...,[32-33],[34],[35-36],[37-38]
    return _split(twelve, [2, 2, 3] + [2] * 8 + [2])


def _uniform(depth: int, num: int) -> list[list[int]]:
    k = depth // num
    return [[i * k, i * k + k - 1] for i in range(num)]


def llava_tower(variant: str, interactions: Optional[int] = None) -> PIIPConfig:
    """The tower of an official PIIP-LLaVA config; ``interactions`` defaults to the 7B count."""
    if variant not in LLAVA_TOWERS:
        raise ValueError(f"unknown PIIP-LLaVA tower {variant!r}; available: {sorted(LLAVA_TOWERS)}")
    fine, hi, lo, grid, counts = LLAVA_TOWERS[variant]
    n = counts[0] if interactions is None else int(interactions)
    if n not in counts:
        raise ValueError(f"PIIP-LLaVA tower {variant} was released with {' or '.join(map(str, counts))} "
                         f"interactions, not {n}")
    large = clip_branch("L", lo, _uniform(24, n), grid)
    if fine == "clip_b":
        small = clip_branch("B", hi, _uniform(12, n), 14)
    else:
        small = dataclasses.replace(convnext(fine[-1].upper(), hi), interaction_groups=convnext_llava_groups(n))
    return PIIPConfig(branches=[small, large], deform_num_heads=16, n_points=4, deform_ratio=0.5, with_cffn=True,
                      cffn_ratio=0.25, interaction_drop_path=0.4, merge=None, pyramid=None, task="features",
                      image_norm="imagenet")


def tower_interactions(cfg: PIIPConfig) -> int:
    return len(cfg.branches[0].interaction_groups)


for _v, (_fine, _hi, _lo, _g, _counts) in LLAVA_TOWERS.items():
    _what = {"clip_b": "CLIP-B", "convnext_b": "ConvNeXt-B", "convnext_l": "ConvNeXt-L"}[_fine]
    for _n in _counts:
        _name = f"piip_llava_{_v}" + ("" if _n == _counts[0] else f"_i{_n}")
        register_model(_name, f"PIIP-LLaVA vision tower {_what} @{_hi} + CLIP-L @{_lo}, {_n} interactions "
                              f"(released config)")(lambda v=_v, n=_n: llava_tower(v, n))


@register_model("llava15_clip_l_336", "LLaVA-1.5's vision tower: CLIP-L/14 @336 alone (baseline of the PIIP-LLaVA "
                                      "FLOP table)")
def llava15_clip_l_336() -> PIIPConfig:
    return PIIPConfig(branches=[clip_branch("L", 336, [[0, 23]], 24, patch_size=14)], merge=None, pyramid=None,
                      task="features")
