"""Training recipes of the detection heads beyond Mask R-CNN (vision_spec D): DINO and Cascade
Mask R-CNN, and the mmdet step schedules. ``head_recipe`` gives a run's defaults; what the command
line sets explicitly wins."""
from __future__ import annotations

from typing import Any

from .config import PIIPConfig

# mmdet step schedules: epochs and the epochs at which the lr drops x0.1
SCHEDULES: dict[str, tuple[int, list[int]]] = {"1x": (12, [8, 11]), "2x": (24, [16, 22]), "3x": (36, [27, 33])}

# Released DINO configs, by backbone name. Test scale (1333k, 800k) with k = finest / 1024; batch 32
# (16 GPUs x 2); the H6B / LH6B entries join when those backbones are registered (InternViT issue).
DINO_RECIPES: dict[str, dict[str, Any]] = {
    # dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.py (57.8 / 57.9 APb)
    "piip_sbl_1792_1120_672_dino": dict(schedule="3x", lr=2e-4, layer_decay=0.85, clip_grad=0.1, aug="ms",
                                        total_batch_size=32, min_size=1400, max_size=2332, pad_divisor=224),
    # dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms.py (60.0 APb)
    "piip_h6b_1024_768_dino": dict(schedule="1x", lr=2e-4, layer_decay=0.85, clip_grad=0.1, aug="ms",
                                   total_batch_size=32, min_size=800, max_size=1333, pad_divisor=64),
    # dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms.py
    "piip_lh6b_1536_1024_512_dino": dict(schedule="2x", lr=2e-4, layer_decay=0.85, clip_grad=0.1, aug="ms",
                                         total_batch_size=32, min_size=1200, max_size=1999, pad_divisor=64),
}


def head_recipe(name: str, cfg: PIIPConfig, kind: str) -> dict[str, Any]:
    """Optimiser / schedule / data defaults of ``kind`` on backbone ``name``: lr, layer_decay,
    clip_grad, and (registered DINO configs) schedule, aug and test sizes. Cascade Mask R-CNN
    [inferred, no released config]: the Mask R-CNN recipe of the backbone."""
    from .zoo import detection_recipe
    recipe: dict[str, Any] = dict(detection_recipe(name, cfg), clip_grad=None)
    if kind == "dino":
        # AdamW 2e-4, grad clip 0.1 (every released DINO config); layer decay as the backbone's Mask R-CNN
        recipe.update(lr=2e-4, clip_grad=0.1)
        recipe.update(DINO_RECIPES.get(name, {}))
    return recipe
