"""COCO box / mask AP with pycocotools' COCOeval (the 12 standard numbers)."""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data.transforms import detection_collate
from ..engine.distributed import all_gather_objects, is_main, rank, world_size

COCO_METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def predictions_to_coco(output: dict[str, torch.Tensor], image_id: int, label_to_cat: dict[int, int],
                        mask_thresh: float = 0.5) -> list[dict[str, Any]]:
    """One image's torchvision detections -> COCO result entries (xywh boxes, RLE masks)."""
    from pycocotools import mask as mask_utils
    boxes = output["boxes"].float().cpu()
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    masks = None
    if "masks" in output:
        masks = (output["masks"][:, 0] > mask_thresh).cpu().numpy().astype(np.uint8)
    out = []
    for i, (b, s, lab) in enumerate(zip(xywh, scores, labels)):
        if lab not in label_to_cat:
            continue
        r: dict[str, Any] = {"image_id": int(image_id), "category_id": int(label_to_cat[lab]),
                             "bbox": [round(v, 2) for v in b], "score": round(float(s), 5)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        out.append(r)
    return out


def coco_evaluate(coco_gt: Any, results: list[dict[str, Any]], iou_types: list[str],
                  img_ids: Optional[list[int]] = None, use_cats: bool = True) -> dict[str, dict[str, float]]:
    """{iou_type: {AP, AP50, ..., ARl}} on the images ``img_ids`` (default: all). ``use_cats=False``
    ignores the classes (COCOeval's ``useCats = 0``): how well objects are found, whatever their label."""
    from pycocotools.cocoeval import COCOeval
    metrics: dict[str, dict[str, float]] = {}
    for t in iou_types:
        res = [r for r in results if t == "bbox" or "segmentation" in r]
        if not res:  # COCO's loadRes cannot take an empty list; no detections = zero AP / AR
            metrics[t] = {k: 0.0 for k in COCO_METRIC_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco_gt.loadRes(res)
            ev = COCOeval(coco_gt, dt, t)
            if img_ids is not None:
                ev.params.imgIds = sorted(img_ids)
            ev.params.useCats = int(use_cats)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[t] = {k: float(v) for k, v in zip(COCO_METRIC_NAMES, ev.stats)}
    return metrics


def mask_image_ids(coco_gt: Any, img_ids: list[int]) -> list[int]:
    """Images (of ``img_ids``) fit for mask AP: every ground-truth annotation has a mask, and the file
    has at least one mask (else none: a box-only file has no mask AP)."""
    from ..data.coco import has_mask
    if not any(has_mask(a) for a in coco_gt.anns.values()):
        return []
    return sorted(i for i in img_ids if all(has_mask(a) for a in coco_gt.imgToAnns.get(i, [])))


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: Any, device: torch.device | str = "cpu", batch_size: int = 2,
                      workers: int = 0, amp: Optional[bool] = None, out_dir: Optional[str] = None,
                      verbose: bool = True) -> dict[str, dict[str, float]]:
    """Run ``model`` over a :class:`~piip.data.CocoDetection` (no train transforms), sharded over
    ranks when distributed, and score on rank 0. Writes ``detections.json`` and ``metrics.json``
    to ``out_dir`` if given. Returns {'bbox': {...}, 'segm': {...}}: segm for mask heads, over the images
    whose ground truth has masks (:func:`mask_image_ids`); none on a box-only file."""
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.eval()
    shard = Subset(dataset, list(range(rank(), len(dataset), world_size())))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=detection_collate)
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    for images, targets in loader:
        if not images:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model([im.to(device) for im in images])
        for out, tgt in zip(outputs, targets):
            results += predictions_to_coco(out, tgt["image_id"], dataset.label_to_cat)
            seen.append(int(tgt["image_id"]))
    model.train(was_training)
    gathered = all_gather_objects((results, seen))
    if not is_main():
        return {}
    results = [r for part, _ in gathered for r in part]
    seen = sorted({i for _, ids in gathered for i in ids})
    missing = len(dataset.ids) - len(seen)
    if not seen:
        raise ValueError(f"evaluation read none of the {len(dataset.ids)} image(s) in {dataset.img_dir!r} (all "
                         "unreadable); check the image folder")
    metrics = coco_evaluate(dataset.coco, results, ["bbox"], img_ids=sorted(dataset.ids))
    segm_ids = mask_image_ids(dataset.coco, dataset.ids)
    if hasattr(model, "roi_heads") and model.roi_heads.has_mask() and segm_ids:
        metrics.update(coco_evaluate(dataset.coco, results, ["segm"], img_ids=segm_ids))
    if verbose:
        for t in metrics:
            print(f"{t}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics[t].items()))
        if "segm" in metrics and len(segm_ids) < len(dataset.ids):
            print(f"note: mask AP is over the {len(segm_ids)} of {len(dataset.ids)} images whose ground truth has masks")
        if missing:
            print(f"note: {missing} unreadable image(s) had no predictions (counted as misses)")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "detections.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({**metrics, "num_images": len(dataset.ids), "num_detections": len(results),
                       "unreadable_images": missing,
                       **({"segm_images": len(segm_ids)} if "segm" in metrics else {})}, f, indent=2)
    return metrics
