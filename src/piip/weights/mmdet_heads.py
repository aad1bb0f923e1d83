"""mmdet (2.x) Mask R-CNN neck/heads -> torchvision MaskRCNN names.

Shapes are identical; what changes is naming and the class order: mmdet's bbox classifier puts
background LAST (81 rows = 80 classes + bg) and its box regressor / mask logits have no background
rows, while torchvision's class 0 is background. So the classifier rows are rotated (bg first)
and a zero background block is prepended to the box regressor (4 rows) and the mask logits (1 row).
Behavioural differences that weights cannot carry are listed in docs/weights.md.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

_RULES = [
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$", r"roi_heads.mask_head.\1.0.\2"),
    (r"^roi_head\.mask_head\.upsample\.(weight|bias)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def _prepend_zero_rows(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t.new_zeros((rows,) + tuple(t.shape[1:])), t], 0)


def convert_mmdet_heads(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmdet ``neck.*`` / ``rpn_head.*`` / ``roi_head.*`` tensors -> torchvision MaskRCNN keys
    (``backbone.fpn.*``, ``rpn.*``, ``roi_heads.*``). Keys of other prefixes (``backbone.*``) are
    ignored; an unknown neck/head key raises a ValueError naming it."""
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in state_dict.items():
        if not k.startswith(("neck.", "rpn_head.", "roi_head.")):
            continue
        for pat, rep in _COMPILED:
            if pat.match(k):
                out[pat.sub(rep, k)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"mmdet neck/head keys with no torchvision equivalent: {sorted(unknown)}")
    cls_w = "roi_heads.box_predictor.cls_score.weight"
    if cls_w in out:
        num_fg = out[cls_w].shape[0] - 1
        for suffix in ("weight", "bias"):
            k = f"roi_heads.box_predictor.cls_score.{suffix}"
            out[k] = torch.cat([out[k][num_fg:], out[k][:num_fg]], 0)  # background last -> first
            k = f"roi_heads.box_predictor.bbox_pred.{suffix}"
            if k in out:
                if out[k].shape[0] != 4 * num_fg:
                    raise ValueError(f"{k}: expected {4 * num_fg} rows (class-specific boxes), got "
                                     f"{out[k].shape[0]}; class-agnostic regression has no torchvision equivalent")
                out[k] = _prepend_zero_rows(out[k], 4)
    for suffix in ("weight", "bias"):
        k = f"roi_heads.mask_predictor.mask_fcn_logits.{suffix}"
        if k in out:
            out[k] = _prepend_zero_rows(out[k], 1)
    return out
