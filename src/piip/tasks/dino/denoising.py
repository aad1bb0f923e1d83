"""Contrastive denoising (DINO's CDN): noised copies of the ground truth as extra decoder queries.

Each group holds a positive copy (small box noise, to be reconstructed) and a negative copy (larger
noise, to be classified as background) of every target; ``dynamic`` group count = ``num_dn //
max targets per image``. The attention mask keeps matching queries from seeing denoising ones and
denoising groups from seeing each other (they may see the matching queries)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .matcher import inverse_sigmoid


@dataclass
class DenoisingMeta:
    """Layout of the denoising part of the queries: ``groups`` groups of ``2 * max_targets`` queries
    (positives in the first half of a group, negatives in the second), ``pad_size`` in total."""

    pad_size: int
    groups: int
    max_targets: int


def denoising_attn_mask(meta: DenoisingMeta, num_queries: int, device: torch.device) -> Tensor:
    """(T, T) bool mask, T = pad_size + num_queries, True = may not attend."""
    p, size = meta.pad_size, 2 * meta.max_targets
    mask = torch.zeros(p + num_queries, p + num_queries, dtype=torch.bool, device=device)
    mask[p:, :p] = True
    for g in range(meta.groups):
        rows = slice(g * size, (g + 1) * size)
        mask[rows, :g * size] = True
        mask[rows, (g + 1) * size:p] = True
    return mask


class CdnQueryGenerator(nn.Module):
    """Denoising queries from the targets (training only). Labels 0..C-1, boxes normalised cxcywh."""

    def __init__(self, num_classes: int, dim: int, num_dn: int = 100, label_noise: float = 0.5,
                 box_noise: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.num_dn = num_classes, num_dn
        self.label_noise, self.box_noise = label_noise, box_noise
        self.label_embedding = nn.Embedding(num_classes, dim)

    def forward(self, labels: list[Tensor], boxes: list[Tensor]
                ) -> Optional[tuple[Tensor, Tensor, DenoisingMeta]]:
        """(content queries (N, P, D), box logits (N, P, 4), meta), or None when no image has a
        target; P = meta.pad_size, slots of images with fewer targets stay zero."""
        counts = [len(t) for t in labels]
        most = max(counts, default=0)
        if most == 0 or self.num_dn <= 0:
            return None
        groups = max(1, self.num_dn // most)
        dev = self.label_embedding.weight.device
        gt_labels, gt_boxes = torch.cat(labels), torch.cat(boxes)
        total = len(gt_labels)
        known_labels = gt_labels.repeat(2 * groups)
        known_boxes = gt_boxes.repeat(2 * groups, 1)
        if self.label_noise > 0:
            flip = torch.rand(known_labels.shape, device=dev) < self.label_noise * 0.5
            known_labels = torch.where(flip, torch.randint_like(known_labels, 0, self.num_classes), known_labels)
        # negatives: the second half of each group, pushed further (noise in [1, 2) box halves)
        negative = torch.zeros(2 * groups, total, dtype=torch.bool, device=dev)
        negative[1::2] = True
        negative = negative.flatten()
        if self.box_noise > 0:
            xyxy = box_convert(known_boxes, "cxcywh", "xyxy")
            half = known_boxes[:, 2:].repeat(1, 2) / 2
            sign = torch.randint_like(known_boxes, 0, 2) * 2.0 - 1.0
            part = torch.rand_like(known_boxes) + negative[:, None].to(known_boxes.dtype)
            xyxy = (xyxy + sign * part * half * self.box_noise).clamp(0.0, 1.0)
            known_boxes = box_convert(xyxy, "xyxy", "cxcywh")
        label_q = self.label_embedding(known_labels)
        box_q = inverse_sigmoid(known_boxes)
        meta = DenoisingMeta(pad_size=2 * groups * most, groups=groups, max_targets=most)
        n = len(labels)
        content = label_q.new_zeros(n, meta.pad_size, label_q.shape[-1])
        anchors = box_q.new_zeros(n, meta.pad_size, 4)
        image = torch.cat([torch.full((c,), i, dtype=torch.long, device=dev) for i, c in enumerate(counts)])
        within = torch.cat([torch.arange(c, device=dev) for c in counts])
        slots = torch.cat([within + most * k for k in range(2 * groups)])
        images = image.repeat(2 * groups)
        content[images, slots] = label_q
        anchors[images, slots] = box_q
        return content, anchors, meta
