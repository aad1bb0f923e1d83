"""The DINO detector on a PIIP / ViTDet backbone, with torchvision's detector interface:
``model(images, targets)`` returns a dict of losses in training and, in eval, one dict per image
with ``boxes`` (xyxy, original image pixels), ``labels`` (1..num_classes) and ``scores``."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbone import PIIPBackbone
from ..configs import DINO_PYRAMID_LEVELS
from .criterion import SetCriterion
from .denoising import CdnQueryGenerator, denoising_attn_mask
from .matcher import cxcywh_to_xyxy
from .neck import ChannelMapper, sine_map_encoding
from .transformer import DeformableTransformer

# the backbone maps DINO reads: pyramid levels 1..3 = strides 8, 16, 32 (the released is_dino outputs)
DINO_LEVELS = tuple(str(lvl) for lvl in DINO_PYRAMID_LEVELS)


class DinoBackbone(nn.Module):
    """``body`` (PIIPBackbone) -> maps at strides 8/16/32 -> ``neck`` (ChannelMapper, + a stride-64 level)."""

    def __init__(self, body: PIIPBackbone, dim: int, levels: int = 4) -> None:
        super().__init__()
        if body.pyramid is None:
            raise ValueError("DINO needs a backbone with a feature pyramid (config pyramid='gn' or 'ln')")
        have = body.cfg.pyramid_levels
        if have is not None and not {1, 2, 3} <= set(have):
            raise ValueError(f"DINO reads pyramid levels 1, 2, 3 (strides 8/16/32); the backbone returns {have}")
        self.body = body
        self.neck = ChannelMapper([body.out_channels[int(k)] for k in DINO_LEVELS], dim,
                                  extra_levels=levels - len(DINO_LEVELS))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        return self.neck([feats[k] for k in DINO_LEVELS])


class DINO(nn.Module):
    def __init__(self, body: PIIPBackbone, num_classes: int, transform: nn.Module, dim: int = 256, heads: int = 8,
                 levels: int = 4, points: int = 4, ffn: int = 2048, enc_layers: int = 6, dec_layers: int = 6,
                 num_queries: int = 900, num_dn: int = 100, label_noise: float = 0.5, box_noise: float = 1.0,
                 detections_per_img: int = 300) -> None:
        super().__init__()
        self.num_classes, self.detections_per_img = num_classes, detections_per_img
        self.transform = transform
        self.backbone = DinoBackbone(body, dim, levels)
        self.transformer = DeformableTransformer(num_classes, dim, heads, levels, points, ffn, enc_layers,
                                                 dec_layers, num_queries)
        self.dn = CdnQueryGenerator(num_classes, dim, num_dn, label_noise, box_noise)
        self.criterion = SetCriterion(num_classes)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        if self.training and targets is None:
            raise ValueError("DINO in training mode needs targets")
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        image_list, targets = self.transform(images, targets)
        x = image_list.tensors
        mask = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(image_list.image_sizes):
            mask[i, :h, :w] = False
        feats = self.backbone(x)
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        pos = [sine_map_encoding(m, self.transformer.dim // 2).to(f.dtype) for m, f in zip(masks, feats)]
        if not self.training:
            out = self.transformer(feats, masks, pos)
            dets = self.postprocess(out["logits"][-1], out["boxes"][-1], image_list.image_sizes)
            return self.transform.postprocess(dets, image_list.image_sizes, original_sizes)
        labels, boxes = self.normalised_targets(targets, image_list.image_sizes)
        dn = self.dn(labels, boxes)
        dn_in = None
        if dn is not None:
            content, anchors, meta = dn
            k = torch.sym_min(self.transformer.num_queries, sum(f.shape[-2] * f.shape[-1] for f in feats))
            dn_in = (content, anchors, denoising_attn_mask(meta, k, x.device))
        out = self.transformer(feats, masks, pos, dn_in)
        if dn is not None:
            p = dn[2].pad_size
            out["dn_logits"], out["dn_boxes"] = out["logits"][:, :, :p], out["boxes"][:, :, :p]
            out["logits"], out["boxes"] = out["logits"][:, :, p:], out["boxes"][:, :, p:]
        scales = [x.new_tensor([w, h, w, h], dtype=torch.float32) for h, w in image_list.image_sizes]
        return self.criterion(out, labels, boxes, scales, dn[2] if dn is not None else None)

    @staticmethod
    def normalised_targets(targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]]
                           ) -> tuple[list[Tensor], list[Tensor]]:
        """Labels 0..C-1 and (cx, cy, w, h) boxes over each image's resized, unpadded size."""
        labels, boxes = [], []
        for t, (h, w) in zip(targets, sizes):
            b = t["boxes"].float()
            scale = b.new_tensor([w, h, w, h])
            cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1) / scale
            labels.append(t["labels"] - 1)
            boxes.append(cxcywh)
        return labels, boxes

    def postprocess(self, logits: Tensor, boxes: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Top ``detections_per_img`` (query, class) pairs by sigmoid score, boxes in resized-image pixels."""
        out = []
        for lg, bx, (h, w) in zip(logits, boxes, sizes):
            scores = lg.float().sigmoid().flatten()
            k = torch.sym_min(self.detections_per_img, scores.numel())   # symbolic under torch.export
            top, idx = scores.topk(k)
            q = torch.div(idx, lg.shape[-1], rounding_mode="floor")
            x0, y0, x1, y1 = cxcywh_to_xyxy(bx[q].float()).unbind(-1)
            xyxy = torch.stack([(x0 * w).clamp(0, w), (y0 * h).clamp(0, h), (x1 * w).clamp(0, w),
                                (y1 * h).clamp(0, h)], -1)
            out.append({"boxes": xyxy, "scores": top, "labels": idx % lg.shape[-1] + 1})
        return out
