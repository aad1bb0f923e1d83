"""The plain-ViT models of the paper with the released hyper-parameters: the Table I detection
backbones (TSB / SBL / TSBL), the Table V pretraining variants, the DINO backbone, the ViTDet
baselines and the ImageNet classifiers.

Branches are listed finest resolution (smallest model) first: PIIP-TSB 1120/896/448 is ViT-T at
1120, ViT-S at 896, ViT-B at 448. Sources: the released Mask R-CNN and classification configs.
"""
from __future__ import annotations

from ..config import BranchConfig, PIIPConfig
from ..registry import register_model
from .builders import DET_DROP_PATH, vit

def _detection(sizes: str, resolutions: tuple[int, ...], window: int) -> PIIPConfig:
    branches = [vit(s, r, window=window, drop_path=DET_DROP_PATH[s]) for s, r in zip(sizes, resolutions)]
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn")


def _register_detection(sizes: str, resolutions: tuple[int, ...], window: int) -> None:
    name = f"piip_{sizes.lower()}_{'_'.join(map(str, resolutions))}"
    desc = f"PIIP-{sizes} {'/'.join(map(str, resolutions))} detection backbone (released Mask R-CNN config)"
    register_model(name, desc)(lambda: _detection(sizes, resolutions, window))


for _res in ((1120, 896, 448), (1568, 896, 448), (1568, 1120, 672)):
    _register_detection("TSB", _res, 14)
for _res in ((1120, 672, 448), (1344, 896, 448), (1568, 896, 672)):
    _register_detection("SBL", _res, 28)
for _res in ((1344, 896, 672, 448), (1568, 1120, 672, 448), (1792, 1568, 1120, 448)):
    _register_detection("TSBL", _res, 28)


# The SBL 1568/1120/672 family of Table V (vision_spec §B.3): per branch (S, B, L) the flavour,
# drop path and stored position grid of the released config; "deit" is DeiT III (224, 21k).
_TABLE_V = {
    "": (("deit", "deit", "deit"), (0.05, 0.15, 0.4), 14, "DeiT III branches"),
    "_augreg": (("augreg",) * 3, (0.2, 0.3, 0.4), 24, "AugReg-384 branches"),
    "_augreg_speedup": (("augreg",) * 3, (0.2, 0.3, 0.4), 24,
                        "AugReg-384 branches, no interaction projections/norms, tanh-GELU MLPs"),
    "_dinov2": (("dinov2",) * 3, (0.2, 0.3, 0.4), 32, "DINOv2 branches (patch 14 resized to 16)"),
    "_mae": (("deit", "mae", "mae"), (0.05, 0.15, 0.4), 14, "DeiT III-S, MAE-B/L branches"),
    "_beitv2": (("deit", "beitv2", "beitv2"), (0.05, 0.15, 0.4), 14, "DeiT III-S, BEiTv2-B/L branches"),
    "_uniperceiver": (("deit", "uniperceiver", "uniperceiver"), (0.05, 0.15, 0.4), 14,
                      "DeiT III-S, Uni-Perceiver-B/L branches"),
}
# layer-scale init of a freshly built branch per flavour (the released classes'; pretrained files overwrite it)
_LAYER_SCALE_INIT = {"beitv2": 1e-6, "uniperceiver": 0.0}


def _table_v(suffix: str) -> PIIPConfig:
    flavours, dps, grid, _ = _TABLE_V[suffix]
    speedup = suffix.endswith("_speedup")
    branches = []
    for size, res, flavour, dp in zip("SBL", (1568, 1120, 672), flavours, dps):
        grid_b = 14 if flavour == "deit" else grid  # DeiT III-S is always the 224 model
        branches.append(vit(size, res, window=28, drop_path=dp, pos_grid=grid_b, flavour=flavour,
                            layer_scale=_LAYER_SCALE_INIT.get(flavour, 1.0),
                            **({"mlp_act": "gelu_tanh"} if speedup else {})))
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn",
                      interaction_proj=not speedup, interaction_norm=not speedup)


for _suffix, (_f, _d, _g, _what) in _TABLE_V.items():
    register_model(f"piip_sbl_1568_1120_672{_suffix}",
                   f"PIIP-SBL 1568/1120/672 detection backbone: {_what} (released Mask R-CNN config)")(
        lambda s=_suffix: _table_v(s))


@register_model("piip_sbl_1792_1120_672_dino",
                "PIIP-SBL 1792/1120/672 DINO backbone, DeiT III-384 branches, maps at strides 8/16/32")
def piip_sbl_1792_1120_672_dino() -> PIIPConfig:
    # window 24 with every third block global, position tables at the 384 grid (24x24)
    branches = [vit(s, r, window=24, global_every=3, drop_path=dp, pos_grid=24)
                for s, r, dp in zip("SBL", (1792, 1120, 672), (0.05, 0.15, 0.4))]
    # the released DINO SBL config normalises with the ImageNet mean / std (vision_spec D.1)
    return PIIPConfig(branches=branches, merge="conv", pyramid="gn", pyramid_levels=[1, 2, 3], image_norm="imagenet")


@register_model("vitdet_b_1024", "ViTDet-B at 1024 (window 14, global blocks 2/5/8/11), single-branch baseline")
def vitdet_b_1024() -> PIIPConfig:
    return PIIPConfig(branches=[vit("B", 1024, groups=1, window=14, drop_path=0.15, global_every=3)],
                      merge=None, pyramid="ln")


@register_model("vitdet_l_1024", "ViTDet-L at 1024 (window 14, every third block global), single-branch baseline")
def vitdet_l_1024() -> PIIPConfig:
    return PIIPConfig(branches=[vit("L", 1024, groups=1, window=14, drop_path=0.4, global_every=3)],
                      merge=None, pyramid="ln")


def _classification(branches: list[BranchConfig], **kw) -> PIIPConfig:
    return PIIPConfig(branches=branches, merge=None, pyramid=None, task="classification", **kw)


@register_model("piip_tsb_368_192_128_cls", "PIIP-TSB 368/192/128 ImageNet classifier (DeiT branches)")
def piip_tsb_368_192_128_cls() -> PIIPConfig:
    # DeiT-1 branches with layer scale 1; position tables stored at each branch's own grid
    return _classification([vit("T", 368, drop_path=0.05, cls_token=True, pos_grid=None),
                            vit("S", 192, drop_path=0.05, cls_token=True, pos_grid=None),
                            vit("B", 128, drop_path=0.2, cls_token=True, pos_grid=None)],
                           head="cls_token", head_token="first_patch")


def _sbl_cls(res: tuple[int, int, int]) -> PIIPConfig:
    # AugReg branches (classification intern_vit_6b.py): no layer scale, constant drop path, position
    # tables stored at each branch's own grid with the unused class slot of the released checkpoints
    return _classification([vit(s, r, drop_path=dp, cls_token=True, layer_scale=None, pos_grid=None,
                                flavour="augreg", drop_path_schedule="constant")
                            for s, r, dp in zip("SBL", res, (0.05, 0.2, 0.4))],
                           head="cls_token", head_token="first_patch")


register_model("piip_sbl_320_160_96_cls", "PIIP-SBL 320/160/96 ImageNet classifier (AugReg branches)")(
    lambda: _sbl_cls((320, 160, 96)))
register_model("piip_sbl_384_192_128_cls", "PIIP-SBL 384/192/128 ImageNet classifier (AugReg branches)")(
    lambda: _sbl_cls((384, 192, 128)))


@register_model("piip_b_512_256_128_cls", "PIIP-B 512/256/128 trained from scratch (Table X), merged-feature head")
def piip_b_512_256_128_cls() -> PIIPConfig:
    # No released config exists. The 512 px branch attends in 16x16 windows: only that reproduces
    # Table X's 4.9G for it (global attention would cost 7.9G; see docs/model_zoo.md).
    def branch(dim: int, heads: int, res: int, window: int = 0) -> BranchConfig:
        return BranchConfig(img_size=res, embed_dim=dim, depth=12, num_heads=heads, cls_token=False,
                            pos_grid=None, layer_scale=None, drop_path=0.1, window_sizes=[window] * 12)
    # merging as the released classification code: GroupNorm(32) + Linear + GroupNorm (vision_spec §F.5)
    return PIIPConfig(branches=[branch(160, 2, 512, window=16), branch(320, 4, 256), branch(640, 8, 128)],
                      merge="gn_linear", pyramid=None, task="classification", head="merged")


@register_model("deit_b_224_cls", "DeiT-B 224 classifier (single-branch baseline)")
def deit_b_224_cls() -> PIIPConfig:
    return _classification([vit("B", 224, groups=1, drop_path=0.1, cls_token=True, layer_scale=None)],
                           head="cls_token")


@register_model("vit_l_224_cls", "ViT-L 224 classifier (single-branch baseline)")
def vit_l_224_cls() -> PIIPConfig:
    return _classification([vit("L", 224, groups=1, drop_path=0.1, cls_token=True, layer_scale=None)],
                           head="cls_token")
