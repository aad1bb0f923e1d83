"""ViT pretraining flavours as settings of the one ViT branch (vision_spec §B.2).

A flavour is a row of :class:`~piip.config.BranchConfig` settings plus a checkpoint layout
(``piip.weights.vit_layouts``); it never needs its own branch class. The settings are those of
the released PIIP detection code for each family.
"""
from __future__ import annotations

from typing import Any

FLAVOURS: dict[str, dict[str, Any]] = {
    # DeiT / DeiT III (mmdet deit.py::vit_models): no class slot, constant drop path
    "deit": {},
    # AugReg, DINOv2, MAE run through the InternViT6B class: class slot kept (unused), linear drop path
    "augreg": {"pos_layout": "learned_cls", "drop_path_schedule": "linear"},
    "dinov2": {"pos_layout": "learned_cls", "drop_path_schedule": "linear"},
    "mae": {"pos_layout": "learned_cls", "drop_path_schedule": "linear"},
    # InternViT-6B (InternViT6B class with qk_normalization): RMSNorm everywhere incl. q/k over the full
    # width, no qkv bias, layer scale 0.1, class slot kept, linear drop path
    "internvit": {"pos_layout": "learned_cls", "drop_path_schedule": "linear", "norm": "rms", "qk_norm": True,
                  "qkv_bias": False, "layer_scale": 0.1},
    # BEiTv2: q/v biases, per-window relative position bias, no absolute position table
    "beitv2": {"qkv_bias": "qv", "pos_layout": "none", "rel_pos_bias": True, "drop_path_schedule": "linear"},
    # Uni-Perceiver: LayerNorm eps 1e-5, embedding LayerNorm after the position add, own key layout
    "uniperceiver": {"norm_eps": 1e-5, "pos_layout": "uniperceiver", "drop_path_schedule": "linear"},
    # CLIP (OpenAI / open_clip / Hugging Face towers, PIIP-LLaVA): bias-free patch conv, class position
    # folded into the class token, ln_pre after the position add, quick-GELU, eps 1e-5, no layer scale.
    # Its layouts are read by piip.weights.clip.
    "clip": {"norm_eps": 1e-5, "mlp_act": "quick_gelu", "patch_bias": False, "pre_norm": True,
             "layer_scale": None, "cls_token": True},
}

POS_LAYOUTS = ("learned", "learned_cls", "none", "uniperceiver")


def flavour_settings(flavour: str) -> dict[str, Any]:
    """The BranchConfig fields a flavour sets (a copy), with a clear error for unknown names."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ViT flavour {flavour!r}; available: {sorted(FLAVOURS)}")
    return {"flavour": flavour, **FLAVOURS[flavour]}
