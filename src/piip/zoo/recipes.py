"""Every training recipe of the zoo: the defaults ``piip train ...`` uses for a model, each of which the
command line can override.

* detection: the released Mask R-CNN optimiser settings (:func:`detection_recipe`), the mmdet step
  schedules, and the DINO / Cascade Mask R-CNN recipes (vision_spec D, :func:`head_recipe`);
* segmentation: the UperNet and optimiser defaults per backbone (:data:`SEG_RECIPES`, filled by
  :func:`register_segmentation_model`);
* classification (:data:`CLASSIFICATION_RECIPES`):

  - ``finetune`` - the released PIIP fine-tuning recipe (vision_spec §F.1): AdamW lr 3e-5 (no batch
    scaling) with 10x for the modules PIIP adds (everything outside the branches and their heads),
    weight decay 0.1 on *every* parameter, 20 epochs, 5 warm-up epochs from 1e-6, cosine to 1e-5
    (absolute, every group), RandAugment rand-m9-mstd0.5-inc1, no random erasing, mixup 0.8 /
    cutmix 1.0 / label smoothing 0.1 with soft-target cross-entropy, EMA 0.99996, AMP.
  - ``scratch`` - the DeiT recipe (inferred for the from-scratch PIIP-B of Table X, §F.5): 300 epochs,
    lr 5e-4 x global batch / 512, weight decay 0.05 except norms / biases / position tables / class
    tokens, 5 warm-up epochs, cosine to 1e-5, random erasing 0.25, drop path 0.1, same mixup and EMA.
"""
from __future__ import annotations

from typing import Any, Callable

from ..config import PIIPConfig
from ..registry import register_model

# ---------------------------------------------------------------------------- detection
def detection_recipe(name: str, cfg: PIIPConfig) -> dict[str, float]:
    """Released Mask R-CNN optimiser settings (AdamW): the ConvNeXt/ViT hybrids use lr 2e-4 and layer
    decay 0.8 (which only reaches ViT blocks), the ConvNeXt-B baseline lr 1e-4 without decay, the
    plain-ViT models lr 1e-4 with decay 0.85 (multi-branch) / 0.95 (single branch)."""
    if name == "convnext_b_1024":
        return {"lr": 1e-4, "layer_decay": 1.0}
    if any(b.kind == "convnext" for b in cfg.branches):
        return {"lr": 2e-4, "layer_decay": 0.8}
    return {"lr": 1e-4, "layer_decay": 0.85 if len(cfg.branches) > 1 else 0.95}


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
    recipe: dict[str, Any] = dict(detection_recipe(name, cfg), clip_grad=None)
    if kind == "dino":
        # AdamW 2e-4, grad clip 0.1 (every released DINO config); layer decay as the backbone's Mask R-CNN
        recipe.update(lr=2e-4, clip_grad=0.1)
        recipe.update(DINO_RECIPES.get(name, {}))
    return recipe


# ---------------------------------------------------------------------------- segmentation
# name -> segmentor / optimiser defaults (SegmentorConfig fields + lr / weight_decay / layer_decay)
SEG_RECIPES: dict[str, dict[str, Any]] = {}

# ViT-Adapter UperNet recipes (ADE20K, 160k iterations, batch 16)
RECIPE_B = {"channels": 512, "aux_channels": 256, "lr": 6e-5, "weight_decay": 0.01, "layer_decay": 0.95}
RECIPE_L = {"channels": 1024, "aux_channels": 256, "lr": 2e-5, "weight_decay": 0.05, "layer_decay": 0.9}
# InternViT-6B / PIIP-H6B (released 80k configs): AdamW lr 4e-5, wd 0.05, layer decay 0.95 over 48 layers
# (skip stride 1.5), UperNet 1536 wide
RECIPE_6B = {"channels": 1536, "aux_channels": 1536, "lr": 4e-5, "weight_decay": 0.05, "layer_decay": 0.95}


def register_segmentation_model(name: str, description: str, make: Callable[[], PIIPConfig],
                                recipe: dict[str, Any]) -> None:
    """Register a segmentation backbone ``make()`` and its :data:`SEG_RECIPES` entry."""
    register_model(name, description)(make)
    SEG_RECIPES[name] = dict(recipe)


def segmentation_recipe(name: str) -> dict[str, Any]:
    """Defaults for ``name``: its registered recipe, else the ViT-B one (UperNet 512, lr 6e-5)."""
    return dict(SEG_RECIPES.get(name, RECIPE_B))


# ---------------------------------------------------------------------------- classification
CLASSIFICATION_RECIPES: dict[str, dict[str, Any]] = {
    "finetune": dict(epochs=20, batch_size=128, lr=3e-5, scale_lr=False, new_lr_scale=10.0, weight_decay=0.1,
                     decay_all=True, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, auto_augment="rand-m9-mstd0.5-inc1",
                     reprob=0.0, mixup=0.8, cutmix=1.0, smoothing=0.1, ema_decay=0.99996, drop_path=None,
                     clip_grad=None),
    "scratch": dict(epochs=300, batch_size=128, lr=5e-4, scale_lr=True, new_lr_scale=1.0, weight_decay=0.05,
                    decay_all=False, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, auto_augment="rand-m9-mstd0.5-inc1",
                    reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, ema_decay=0.99996, drop_path=0.1,
                    clip_grad=None),
}
