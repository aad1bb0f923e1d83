"""The ConvNeXt / ViT hybrids of Table II (released regular-FPN Mask R-CNN configs) and their
single-branch ConvNeXt-B baseline."""
from __future__ import annotations

from ..config import PIIPConfig
from ..registry import register_model
from .builders import CONVNEXT_DROP_PATH, DET_DROP_PATH, convnext, vit


def _hybrid(letters: str) -> PIIPConfig:
    """Finest first, e.g. 'ct_vs_vb': ConvNeXt-T @1024, ViT-S @672, ViT-B @448 (released hybrid configs)."""
    branches = []
    for code, res in zip(letters.split("_"), (1024, 672, 448)):
        kind, size = code[0], code[1].upper()
        branches.append(convnext(size, res, CONVNEXT_DROP_PATH[size]) if kind == "c"
                        else vit(size, res, window=14, drop_path=DET_DROP_PATH[size]))
    return PIIPConfig(branches=branches, merge="regular_fpn", out_groups=[0, 1, 10], pyramid="gn",
                      image_norm="imagenet")


for _h in ("ct_cs_cb", "ct_vs_vb", "ct_cs_vb", "ct_vs_cb", "vt_cs_vb", "vt_cs_cb", "vt_vs_cb", "vt_vs_vb"):
    register_model(f"piip_{_h}_1024_672_448",
                   f"PIIP-{_h.upper().replace('_', '-')} 1024/672/448 ConvNeXt/ViT hybrid, regular-FPN merging "
                   "(Table II)")(lambda _h=_h: _hybrid(_h))


@register_model("convnext_b_1024", "ConvNeXt-B at 1024, four stage maps (single-branch baseline of Table II)")
def convnext_b_1024() -> PIIPConfig:
    return PIIPConfig(branches=[convnext("B", 1024, groups="stages")], merge=None, out_groups=[0, 1, 2],
                      pyramid="gn", image_norm="imagenet")
