"""DINO's training losses: sigmoid focal classification (alpha 0.25, gamma 2, weight 1), L1 on
normalised (cx, cy, w, h) (weight 5) and GIoU (weight 2) on matched / denoising-positive queries,
each normalised by the number of targets over all processes (``sync_cls_avg_factor``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .denoising import DenoisingMeta
from .matcher import HungarianMatcher, cxcywh_to_xyxy


def _mean_over_ranks(x: float, device: torch.device) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(x, dtype=torch.float32, device=device)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()
    return x


@dataclass
class SetCriterion:
    num_classes: int
    matcher: HungarianMatcher = field(default_factory=HungarianMatcher)
    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0

    def layer_loss(self, logits: Tensor, boxes: Tensor, labels: list[Tensor], gt_boxes: list[Tensor],
                   assigned: list[tuple[Tensor, Tensor]], avg: float, scales: list[Tensor]
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """(class, L1, GIoU) losses of one prediction set (N, Q, C) / (N, Q, 4) given, per image,
        (query indices, target indices); unassigned queries are background. GIoU on pixel boxes
        (normalised boxes x ``scales``, each image's (w, h, w, h))."""
        target = torch.zeros_like(logits)
        b_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(assigned)])
        q_idx = torch.cat([q for q, _ in assigned])
        t_lab = torch.cat([lab[g] for lab, (_, g) in zip(labels, assigned)])
        target[b_idx, q_idx, t_lab] = 1.0
        loss_cls = sigmoid_focal_loss(logits.float(), target, self.alpha, self.gamma, reduction="sum") / avg
        if q_idx.numel() == 0:
            zero = boxes.sum() * 0.0
            return self.weight_class * loss_cls, zero, zero
        pred = boxes[b_idx, q_idx].float()
        tgt = torch.cat([bx[g] for bx, (_, g) in zip(gt_boxes, assigned)]).float()
        loss_l1 = (pred - tgt).abs().sum() / avg
        px = torch.cat([scales[i].float().expand(len(q), 4) for i, (q, _) in enumerate(assigned)])
        loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(pred) * px, cxcywh_to_xyxy(tgt) * px,
                                             reduction="sum") / avg
        return self.weight_class * loss_cls, self.weight_bbox * loss_l1, self.weight_giou * loss_giou

    def __call__(self, outputs: dict, labels: list[Tensor], boxes: list[Tensor], scales: list[Tensor],
                 dn_meta: Optional[DenoisingMeta] = None) -> dict[str, Tensor]:
        """``outputs``: ``logits`` / ``boxes`` (layers, N, Q, ·) of the matching queries, ``enc_logits``
        / ``enc_boxes`` (N, Q, ·) of the selected encoder proposals, and with ``dn_meta`` the
        denoising queries' ``dn_logits`` / ``dn_boxes`` (layers, N, pad, ·). Targets per image:
        labels 0..C-1 and normalised (cx, cy, w, h) boxes, and the image's (w, h, w, h) in pixels."""
        device = outputs["logits"].device
        avg = max(_mean_over_ranks(float(sum(len(t) for t in labels)), device), 1.0)
        sums = {}

        def add(prefix: str, loss: tuple[Tensor, Tensor, Tensor]) -> None:
            for name, v in zip(("cls", "bbox", "giou"), loss):
                sums[f"{prefix}_{name}"] = sums.get(f"{prefix}_{name}", 0) + v

        layers = outputs["logits"].shape[0]
        for i in range(layers):
            lg, bx = outputs["logits"][i], outputs["boxes"][i]
            assigned = [self.matcher(lg[n], bx[n], labels[n], boxes[n], scales[n]) for n in range(len(labels))]
            add("loss" if i == layers - 1 else "aux", self.layer_loss(lg, bx, labels, boxes, assigned, avg, scales))
        if "enc_logits" in outputs:
            lg, bx = outputs["enc_logits"], outputs["enc_boxes"]
            assigned = [self.matcher(lg[n], bx[n], labels[n], boxes[n], scales[n]) for n in range(len(labels))]
            add("enc", self.layer_loss(lg, bx, labels, boxes, assigned, avg, scales))
        if dn_meta is not None:
            assigned = [denoising_assignment(dn_meta, len(t), device) for t in labels]
            for i in range(outputs["dn_logits"].shape[0]):
                add("dn", self.layer_loss(outputs["dn_logits"][i], outputs["dn_boxes"][i], labels, boxes,
                                          assigned, avg * dn_meta.groups, scales))
        return {k: v for k, v in sums.items()}


def denoising_assignment(meta: DenoisingMeta, num_targets: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(query, target) pairs of one image's denoising positives: target t in group g sits at query
    ``g * 2 * max_targets + t``; negatives and empty slots are background."""
    t = torch.arange(num_targets, device=device)
    starts = torch.arange(meta.groups, device=device) * 2 * meta.max_targets
    return (starts[:, None] + t[None]).flatten(), t.repeat(meta.groups)
