"""One-to-one matching of queries to ground truth (Hungarian, scipy's ``linear_sum_assignment``)
with DINO's cost: focal classification cost + L1 on normalised (cx, cy, w, h) + negative GIoU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] first (as DINO / mmdet)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    return box_convert(b, "cxcywh", "xyxy")


def focal_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
               eps: float = 1e-12) -> Tensor:
    """(Q, C) logits, (G,) labels in 0..C-1 -> (Q, G): the focal loss of calling query q class
    labels[g] minus that of calling it background (mmdet ``FocalLossCost``)."""
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, labels] - neg[:, labels]


@dataclass
class HungarianMatcher:
    """Costs weighted as the released DINO config: class 2.0, L1 5.0, GIoU 2.0."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    @torch.no_grad()
    def cost(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
             scale: Optional[Tensor] = None) -> Tensor:
        """(Q, G) cost; boxes and gt_boxes normalised (cx, cy, w, h); the GIoU is taken on boxes
        multiplied by ``scale`` = (w, h, w, h) of the image (pixels, as mmdet; GIoU is not invariant
        to stretching)."""
        c = self.cost_class * focal_cost(logits.float(), gt_labels)
        c = c + self.cost_bbox * torch.cdist(boxes.float(), gt_boxes.float(), p=1)
        s = 1.0 if scale is None else scale.float()
        return c - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes.float()) * s,
                                                        cxcywh_to_xyxy(gt_boxes.float()) * s)

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                 scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(query indices, gt indices) of the minimum-cost assignment for one image."""
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        from ...errors import require
        linear_sum_assignment = require("scipy.optimize", "DINO's Hungarian matching").linear_sum_assignment
        c = self.cost(logits, boxes, gt_labels, gt_boxes, scale).cpu()
        if not torch.isfinite(c).all():
            raise ValueError("DINO matching cost is not finite (NaN / inf predictions); lower the learning rate "
                             "or enable gradient clipping (--clip-grad 0.1)")
        q, g = linear_sum_assignment(c.numpy())
        dev = logits.device
        return torch.as_tensor(q, dtype=torch.int64, device=dev), torch.as_tensor(g, dtype=torch.int64, device=dev)
