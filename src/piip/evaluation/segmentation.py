"""Semantic segmentation metrics: mIoU, mAcc, aAcc and per-class IoU / accuracy from a confusion
matrix, as mmseg's ``mean_iou``.

Own implementation rather than torchmetrics: torchmetrics is not a piip dependency, and a (K, K)
int64 confusion matrix is a few lines, exact, and sums across processes with one ``all_reduce``.
Classes absent from both the ground truth and the predictions have IoU NaN and are left out of the
means (mmseg's ``nanmean``); pixels labelled 255 are ignored.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..engine.distributed import is_main, rank, world_size

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0]
        raise ValueError(f"target holds value {int(bad)}, not a class id 0..{num_classes - 1} or {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def metrics_from_confusion(cm: Tensor, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (in %) and per-class IoU / Acc (NaN where undefined -> None in the dict)."""
    cm = cm.double()
    inter = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - inter
    iou = inter / union            # NaN where union == 0
    acc = inter / gt               # NaN where the class never occurs in the ground truth
    names = list(class_names) if class_names else [str(i) for i in range(cm.shape[0])]

    def nanmean(x: Tensor) -> float:
        v = x[~torch.isnan(x)]
        return float(v.mean() * 100) if v.numel() else float("nan")

    def val(x: float) -> Optional[float]:
        return None if math.isnan(x) else round(x * 100, 4)

    return {"mIoU": nanmean(iou), "mAcc": nanmean(acc),
            "aAcc": float(inter.sum() / gt.sum() * 100) if gt.sum() > 0 else float("nan"),
            "per_class": {n: {"IoU": val(float(i)), "Acc": val(float(a))} for n, i, a in zip(names, iou, acc)}}


def _collate_one(batch: list) -> Any:
    return batch[0]


@torch.no_grad()
def evaluate_segmentor(model: nn.Module, dataset: Any, device: torch.device | str = "cpu", mode: str = "slide",
                       amp: Optional[bool] = None, workers: int = 0, out_dir: Optional[str] = None,
                       verbose: bool = True) -> dict[str, Any]:
    """Run ``model.predict`` over ``dataset`` (items: test-resized image, mask at its original size;
    see :class:`~piip.data.segmentation.SegTestTransform`), one image at a time, sharded over ranks;
    logits are resized to the mask and the confusion matrices summed over ranks. Writes
    ``metrics.json`` to ``out_dir`` if given (rank 0). Returns the metrics on every rank."""
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    k = model.seg_cfg.num_classes
    was_training = model.training
    model.eval()
    shard = Subset(dataset, list(range(rank(), len(dataset), world_size())))
    loader = DataLoader(shard, batch_size=1, num_workers=workers, collate_fn=_collate_one)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for item in loader:
        if item is None:
            continue
        img, mask = item
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model.predict(img[None].to(device), mode=mode)
        logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(logits.argmax(1)[0], mask.to(device), k)
        seen += 1
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
        dist.all_reduce(seen)
    if int(seen) == 0:
        raise ValueError(f"evaluation read none of the {len(dataset)} sample(s) (all unreadable)")
    names = getattr(model.seg_cfg, "class_names", None) or getattr(dataset, "class_names", None)
    metrics = metrics_from_confusion(cm.cpu(), names)
    metrics["num_images"] = int(seen)
    metrics["mode"] = mode
    if verbose and is_main():
        print(f"segmentation ({int(seen)} images, {mode}): mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} "
              f"aAcc {metrics['aAcc']:.2f}")
    if out_dir and is_main():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(_json_safe(metrics), f, indent=1)
    return metrics


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj
