"""Cascade Mask R-CNN heads on torchvision's RoI machinery (mmdet ``cascade_mask_rcnn_r50_fpn``).

Three box stages with IoU thresholds 0.5 / 0.6 / 0.7 and loss weights 1 / 0.5 / 0.25; each stage
has its own Shared2FC box head with class-agnostic regression and its own target stds (0.1, 0.2),
(0.05, 0.1), (0.033, 0.067), i.e. BoxCoder weights 10/5, 20/10, 30/15. During training every
stage re-samples the previous stage's regressed proposals (the ground truth boxes added as
proposals are dropped before regressing); at test the class scores are the mean of the three
stages' logits on the last stage's boxes (mmdet 2.x). Matching, sampling, RoIAlign, box coding,
the Fast R-CNN loss, the mask head and its loss and inference are torchvision's. The mask head
runs on the last stage only (mmdet trains one per stage and averages them at test)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_WEIGHTS = (1.0, 0.5, 0.25)
REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


class AgnosticPredictor(FastRCNNPredictor):
    """Class scores for ``num_classes`` (background included) and one class-agnostic box delta."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


class CascadeRoIHeads(RoIHeads):
    """``box_head`` / ``box_predictor`` are ModuleLists with one entry per stage; ``proposal_matcher``
    and ``box_coder`` are switched to the stage's own before torchvision's helpers run."""

    def __init__(self, box_roi_pool: nn.Module, in_channels: int, head_dim: int, num_classes: int,
                 batch_size_per_image: int, positive_fraction: float, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, mask_roi_pool: Optional[nn.Module] = None,
                 mask_head: Optional[nn.Module] = None, mask_predictor: Optional[nn.Module] = None,
                 iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS, stage_weights: tuple[float, ...] = STAGE_WEIGHTS,
                 reg_weights: tuple[tuple[float, ...], ...] = REG_WEIGHTS) -> None:
        if not len(iou_thresholds) == len(stage_weights) == len(reg_weights):
            raise ValueError("iou_thresholds, stage_weights and reg_weights need one entry per stage")
        n = len(iou_thresholds)
        super().__init__(box_roi_pool, nn.ModuleList(TwoMLPHead(in_channels, head_dim) for _ in range(n)),
                         nn.ModuleList(AgnosticPredictor(head_dim, num_classes) for _ in range(n)),
                         iou_thresholds[0], iou_thresholds[0], batch_size_per_image, positive_fraction,
                         reg_weights[0], score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool, mask_head, mask_predictor)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.coders = [det_utils.BoxCoder(w) for w in reg_weights]
        self.stage_weights = tuple(stage_weights)

    def _use_stage(self, i: int) -> None:
        self.proposal_matcher, self.box_coder = self.matchers[i], self.coders[i]

    def _stage(self, i: int, features: dict[str, Tensor], boxes: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        x = self.box_roi_pool(features, boxes, image_shapes)
        return self.box_predictor[i](self.box_head[i](x))

    def _sample(self, boxes: list[Tensor], targets: list[dict[str, Tensor]]
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Proposals (+ gt), sampled: (boxes, matched gt index, labels, is-a-gt-box) per image."""
        dtype = boxes[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        counts = [len(b) for b in boxes]
        boxes = self.add_gt_proposals(boxes, gt_boxes)
        matched, labels = self.assign_targets_to_proposals(boxes, gt_boxes, [t["labels"] for t in targets])
        keep = self.subsample(labels)
        return ([b[k] for b, k in zip(boxes, keep)], [m[k] for m, k in zip(matched, keep)],
                [lab[k] for lab, k in zip(labels, keep)], [k >= c for k, c in zip(keep, counts)])

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: Optional[list[dict[str, Tensor]]] = None):  # noqa: ANN201
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads in training mode needs targets")
            return [], self._train(features, proposals, image_shapes, targets)
        return self._infer(features, proposals, image_shapes), {}

    def _train(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        n_cls = self.box_predictor[0].cls_score.out_features
        for i, weight in enumerate(self.stage_weights):
            self._use_stage(i)
            boxes, matched, labels, is_gt = self._sample(boxes, targets)
            gt = [t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else torch.zeros_like(b)
                  for t, m, b in zip(targets, matched, boxes)]
            reg_targets = self.box_coder.encode(gt, boxes)
            logits, deltas = self._stage(i, features, boxes, image_shapes)
            loss_cls, loss_box = fastrcnn_loss(logits, deltas.repeat(1, n_cls), labels, reg_targets)
            losses[f"s{i}_loss_classifier"] = weight * loss_cls
            losses[f"s{i}_loss_box_reg"] = weight * loss_box
            if i == len(self.stage_weights) - 1:
                if self.has_mask():
                    losses["loss_mask"] = self._mask_loss(features, boxes, matched, labels, image_shapes, targets)
                break
            with torch.no_grad():   # next stage's proposals: this stage's regressed boxes, gt boxes left out
                regressed = self.box_coder.decode_single(deltas.detach(), torch.cat(boxes))
                parts = regressed.split([len(b) for b in boxes])
                boxes = [box_ops.clip_boxes_to_image(p, s)[~g] for p, s, g in zip(parts, image_shapes, is_gt)]
        return losses

    def _mask_loss(self, features: dict[str, Tensor], boxes: list[Tensor], matched: list[Tensor],
                   labels: list[Tensor], image_shapes: list[tuple[int, int]],
                   targets: list[dict[str, Tensor]]) -> Tensor:
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [b[p] for b, p in zip(boxes, pos)]
        x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        return maskrcnn_loss(x, mask_boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
                             [m[p] for m, p in zip(matched, pos)])

    def _infer(self, features: dict[str, Tensor], boxes: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        counts = [b.shape[0] for b in boxes]   # symbolic (len() would fix it under torch.export)
        all_logits = []
        for i in range(len(self.stage_weights)):
            self._use_stage(i)
            logits, deltas = self._stage(i, features, boxes, image_shapes)
            all_logits.append(logits)
            if i < len(self.stage_weights) - 1:
                regressed = self.box_coder.decode_single(deltas, torch.cat(boxes))
                boxes = [box_ops.clip_boxes_to_image(p, s) for p, s in zip(regressed.split(counts), image_shapes)]
        logits = torch.stack(all_logits).mean(0)
        dets_boxes, scores, labels = self.postprocess_detections(logits, deltas.repeat(1, logits.shape[-1]),
                                                                 boxes, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(dets_boxes, scores, labels)]
        if self.has_mask():
            x = self.mask_roi_pool(features, dets_boxes, image_shapes)
            probs = maskrcnn_inference(self.mask_predictor(self.mask_head(x)), labels)
            for r, p in zip(result, probs):
                r["masks"] = p
        return result
