"""InternViT-6B, PIIP-H6B and PIIP-LH6B: the released detection and segmentation configs
(vision_spec §C.2, names finest-first as in §G).

Branches: InternViT-6B (3200 x 48, 25 heads, flavour ``internvit``), MAE-H (1280 x 32, flavour ``mae``),
DeiT III-L 384 (LH6B only). All attention is global (the released InternViT configs use no windows;
the paper's Table IV used window 14). ``_speedup``, LH6B and every segmentation config drop the
interaction projections and norms and use the tanh-GELU ("fused") MLP. Blocks of the InternViT-class
branches (6B, MAE-H) are activation-checkpointed while training, as the released ``with_cp=True``.
"""
from __future__ import annotations

import dataclasses

from ..branches.flavours import flavour_settings
from ..config import BranchConfig, PIIPConfig, uniform_groups
from ..registry import register_model
from .builders import vit
from .recipes import RECIPE_6B, register_segmentation_model

INTERNVIT_6B = (3200, 48, 25)  # width, depth, heads
DROP_PATH = 0.4                # linear 0 -> 0.4 in both InternViT-class branches


def internvit_6b(img_size: float, groups: list[list[int]], fused_mlp: bool = False,
                 pos_grid: int | None = 14) -> BranchConfig:
    """The InternViT-6B branch; ``pos_grid`` 14 = the 224 px pretraining table (detection), None = the
    branch's own grid (the segmentation code stores it there)."""
    dim, depth, heads = INTERNVIT_6B
    return BranchConfig(img_size=img_size, embed_dim=dim, depth=depth, num_heads=heads, drop_path=DROP_PATH,
                        pos_grid=pos_grid, interaction_groups=groups, with_cp=True,
                        **flavour_settings("internvit"), **({"mlp_act": "gelu_tanh"} if fused_mlp else {}))


def mae_h(img_size: float, groups: list[list[int]], fused_mlp: bool = False,
          pos_grid: int | None = 14) -> BranchConfig:
    """MAE-H (patch-14 pretraining, run at patch 16), layer scale init 1, checkpointed blocks."""
    b = vit("H", img_size, groups=1, drop_path=DROP_PATH, flavour="mae", pos_grid=pos_grid, with_cp=True,
            **({"mlp_act": "gelu_tanh"} if fused_mlp else {}))
    return dataclasses.replace(b, interaction_groups=groups)


# 12 interactions: 6B runs 4 blocks per group; MAE-H 2,2,2,2 then 3 x 8 (32 blocks)
H6B_GROUPS_6B = uniform_groups(48, 12)
H6B_GROUPS_H = [[2 * i, 2 * i + 1] for i in range(4)] + [[8 + 3 * i, 10 + 3 * i] for i in range(8)]


def _h6b(res_h: int, res_6b: int, speedup: bool, pos_grid: int | None = 14, **kw) -> PIIPConfig:
    branches = [mae_h(res_h, H6B_GROUPS_H, fused_mlp=speedup, pos_grid=pos_grid),
                internvit_6b(res_6b, H6B_GROUPS_6B, fused_mlp=speedup, pos_grid=pos_grid)]
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn", interaction_proj=not speedup,
                      interaction_norm=not speedup, **kw)


def _lh6b(**kw) -> PIIPConfig:
    # 4 interactions; DeiT III-L 384 (gamma layer scale, pos grid 24, constant drop path), fused MLPs
    deit_l = dataclasses.replace(vit("L", 1536, drop_path=0.4, pos_grid=24, mlp_act="gelu_tanh"),
                                 interaction_groups=uniform_groups(24, 4))
    branches = [deit_l, mae_h(1024, uniform_groups(32, 4), fused_mlp=True),
                internvit_6b(512, uniform_groups(48, 4), fused_mlp=True)]
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn", interaction_proj=False,
                      interaction_norm=False, **kw)


@register_model("internvit_6b_1024", "InternViT-6B at 1024, global attention, LN simple pyramid (released "
                                     "Mask R-CNN baseline)")
def internvit_6b_1024() -> PIIPConfig:
    return PIIPConfig(branches=[internvit_6b(1024, [[0, 47]])], merge=None, pyramid="ln")


register_model("piip_h6b_1024_512", "PIIP-H6B 1024/512 detection backbone: MAE-H @1024, InternViT-6B @512 "
                                    "(released Mask R-CNN config)")(lambda: _h6b(1024, 512, speedup=False))
register_model("piip_h6b_1024_512_speedup", "PIIP-H6B 1024/512 without interaction projections/norms, "
                                            "tanh-GELU MLPs (released '_speedup' config)")(
    lambda: _h6b(1024, 512, speedup=True))
register_model("piip_h6b_1024_768_dino", "PIIP-H6B 1024/768 DINO backbone (MAE-H @1024, InternViT-6B @768), "
                                         "maps at strides 8/16/32")(
    lambda: _h6b(1024, 768, speedup=False, pyramid_levels=[1, 2, 3]))
register_model("piip_lh6b_1536_1024_512", "PIIP-LH6B 1536/1024/512 detection backbone: DeiT III-L @1536, MAE-H "
                                          "@1024, InternViT-6B @512, 4 interactions (released Mask R-CNN config)")(
    lambda: _lh6b())
register_model("piip_lh6b_1536_1024_512_dino", "PIIP-LH6B 1536/1024/512 DINO backbone, maps at strides 8/16/32")(
    lambda: _lh6b(pyramid_levels=[1, 2, 3]))


# ---------------------------------------------------------------------------- ADE20K UperNet 80k
register_segmentation_model(
    "internvit_6b_512_seg", "InternViT-6B 512 UperNet ADE20K baseline (released 80k config, tanh-GELU MLPs)",
    lambda: PIIPConfig(branches=[internvit_6b(512, [[0, 47]], fused_mlp=True, pos_grid=None)], merge=None,
                       pyramid="ln", image_norm="imagenet"),
    RECIPE_6B)
for _r in (192, 256, 384, 512):
    register_segmentation_model(
        f"piip_h6b_512_{_r}_seg", f"PIIP-H6B UperNet ADE20K backbone: MAE-H @512, InternViT-6B @{_r} (released 80k "
                                  "config, no interaction projections/norms, tanh-GELU MLPs)",
        lambda r=_r: _h6b(512, r, speedup=True, pos_grid=None, image_norm="imagenet"), RECIPE_6B)
