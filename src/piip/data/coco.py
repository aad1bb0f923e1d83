"""COCO-format instance dataset (annotation JSON + image folder) via pycocotools."""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .robust import check_on_error, load_or_substitute, transform_sample


class CocoDetection(Dataset):
    """Yields ``(image, target)``: image float (3, H, W) RGB in [0, 1]; target has ``boxes`` (xyxy,
    float32), ``labels`` (1..K, contiguous over the sorted category ids), ``masks`` (N, H, W) uint8,
    ``image_id``, ``orig_size`` (H, W).

    Annotation clean-up as mmdet's CocoDataset: crowd boxes, boxes under 1 px wide/high or with
    non-positive area are dropped. ``skip_empty`` (training) leaves out images with no usable
    annotation.

    Masks (``with_masks``): an annotation's ``segmentation`` may be polygons, RLE (compressed or not),
    empty or absent. Polygons with fewer than 3 points are dropped; an instance left without a mask
    is left out of mask training, box included (mmdet 3.x ``LoadAnnotations``: ``ignore_flag``), and
    counted in ``without_mask`` (one warning). A file where no instance has a mask is refused: train a
    box detector on it (``with_masks=False``: Faster R-CNN, RetinaNet, DINO). An unreadable image is reported once and replaced by the next readable one
    (training, ``on_error='substitute'``) or returned as ``None`` (evaluation, ``on_error='none'``;
    :func:`detection_collate` drops it) so one bad file never kills a run.
    """

    def __init__(self, ann_file: str, img_dir: str, transforms: Optional[Callable] = None,
                 skip_empty: bool = False, with_masks: bool = True, on_error: str = "substitute",
                 seed: int = 0) -> None:
        from pycocotools.coco import COCO
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"image folder not found: {img_dir}")
        check_on_error(on_error)
        with _quiet():
            self.coco = COCO()
            self.coco.dataset = read_coco_json(ann_file)
            self.coco.createIndex()
        self.img_dir, self.transforms, self.with_masks, self.on_error = img_dir, transforms, with_masks, on_error
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = self._existing(sorted(self.coco.getImgIds()), ann_file)
        self.without_mask = self._count_without_mask(ann_file, ids) if with_masks else 0
        if skip_empty:
            kept = [i for i in ids if self._valid_anns(i)]
            if len(kept) < len(ids):
                warnings.warn(f"{ann_file}: skipping {len(ids) - len(kept)} of {len(ids)} images with no usable "
                              "annotation (crowd-only, degenerate or none)", stacklevel=2)
            ids = kept
        if not ids:
            raise ValueError(f"{ann_file}: no images to use")
        self.ids = ids
        self.seed, self.epoch = seed, 0
        self._bad: set[int] = set()   # indices of unreadable images (reported once)

    def _existing(self, ids: list[int], ann_file: str) -> list[int]:
        """Image ids whose file exists; the missing ones are dropped with one warning (all missing: error)."""
        gone = [i for i in ids if not os.path.isfile(os.path.join(self.img_dir, self.coco.imgs[i]["file_name"]))]
        if not gone:
            return ids
        example = os.path.join(self.img_dir, self.coco.imgs[gone[0]]["file_name"])
        if len(gone) == len(ids):
            raise FileNotFoundError(f"none of the {len(ids)} images listed in {ann_file} exist in {self.img_dir!r} "
                                    f"(e.g. {example!r}); check the image folder argument")
        warnings.warn(f"{ann_file}: skipping {len(gone)} of {len(ids)} images missing from {self.img_dir!r} "
                      f"(e.g. {example!r})", stacklevel=3)
        missing = set(gone)
        return [i for i in ids if i not in missing]

    def _count_without_mask(self, ann_file: str, ids: list[int]) -> int:
        """Instances (of images ``ids``) without a usable mask; refuses a file without any mask."""
        anns = [a for i in ids for a in self._valid_anns(i, need_mask=False)]
        lacking = sum(not has_mask(a) for a in anns)
        if anns and lacking == len(anns):
            raise ValueError(f"{ann_file}: none of its {len(anns)} annotations has a mask ('segmentation' missing, "
                             "empty or invalid); Mask R-CNN / Cascade Mask R-CNN train on masks: train a box "
                             "detector on this file instead (--kind faster_rcnn, retinanet or dino)")
        if lacking:
            warnings.warn(f"{ann_file}: {lacking} of {len(anns)} annotations have no mask ('segmentation' missing, "
                          "empty or invalid); they are left out of mask training, box included (mmdet's rule)",
                          stacklevel=3)
        return lacking

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index): identical after a resume."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _valid_anns(self, img_id: int, need_mask: Optional[bool] = None) -> list[dict[str, Any]]:
        """The image's trainable annotations (with a mask too when ``need_mask``, default ``with_masks``)."""
        need_mask = self.with_masks if need_mask is None else need_mask
        info = self.coco.imgs[img_id]
        out = []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0) or a.get("ignore", 0) or a["category_id"] not in self.cat_to_label:
                continue
            if need_mask and not has_mask(a):
                continue
            x, y, w, h = a["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(info["width"]), x + w), min(float(info["height"]), y + h)
            if a.get("area", w * h) <= 0 or w < 1 or h < 1 or x2 <= x1 or y2 <= y1:
                continue
            out.append(a)
        return out

    def load_image(self, img_id: int) -> Tensor:
        from .images import read_rgb
        return read_rgb(os.path.join(self.img_dir, self.coco.imgs[img_id]["file_name"])).float().div_(255)

    def target(self, img_id: int, h: int, w: int) -> dict[str, Any]:
        anns = self._valid_anns(img_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        t: dict[str, Any] = {"boxes": boxes,
                             "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                                    dtype=torch.int64),
                             "image_id": img_id, "orig_size": (h, w)}
        if self.with_masks:
            info = self.coco.imgs[img_id]
            if (info["height"], info["width"]) != (h, w):
                raise ValueError(f"image {info['file_name']} is {h}x{w} but the annotation says "
                                 f"{info['height']}x{info['width']}")
            masks = [self.coco.annToMask({**a, "segmentation": usable_segmentation(a)}) for a in anns]
            t["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        return t

    def __getitem__(self, index: int):
        found = load_or_substitute(
            index, len(self.ids), lambda i: self.load_image(self.ids[i]),
            lambda i: f"image {self.coco.imgs[self.ids[i]].get('file_name')!r} (id {self.ids[i]})",
            self._bad, self.on_error, f"the image folder {self.img_dir}")
        if found is None:
            return None
        i, img = found
        target = self.target(self.ids[i], img.shape[1], img.shape[2])
        if self.transforms is not None:
            sample = f"sample {i} (image {self.coco.imgs[self.ids[i]].get('file_name')!r}, id {self.ids[i]})"
            img, target = transform_sample(self.transforms, (img, target, random.Random(hash((self.seed, self.epoch, i)))),
                                           sample)
        return img, target


def _polygon_ok(p: Any) -> bool:
    return isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0


def usable_segmentation(ann: dict[str, Any]) -> Any:
    """The annotation's ``segmentation`` without polygons of fewer than 3 points (pycocotools cannot
    rasterise those); None when nothing usable is left (missing, ``[]``, an RLE without counts/size)."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [p for p in seg if _polygon_ok(p)]
        return polys or None
    if isinstance(seg, dict) and seg.get("size") is not None and isinstance(seg.get("counts"), (list, str, bytes)):
        return seg
    return None


def has_mask(ann: dict[str, Any]) -> bool:
    """Whether a COCO annotation carries a usable mask (polygons or RLE)."""
    return usable_segmentation(ann) is not None


def read_coco_json(path: str) -> dict[str, Any]:
    """A COCO annotation file, checked enough that every later failure is a clear message."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {path!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"annotation file {path!r}: expected a COCO object with 'images', 'annotations' and "
                         f"'categories', got a JSON {type(d).__name__}")
    absent = [k for k in ("images", "categories") if not isinstance(d.get(k), list)]
    if absent:
        raise ValueError(f"annotation file {path!r} is not in COCO format: no list {absent} (found keys "
                         f"{sorted(d)[:8]})")
    if not d["categories"]:
        raise ValueError(f"annotation file {path!r} lists no categories")
    d.setdefault("annotations", [])
    bad_img = [im for im in d["images"] if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im)]
    if bad_img:
        raise ValueError(f"annotation file {path!r}: {len(bad_img)} image entr(ies) lack id/file_name/height/width, "
                         f"e.g. {str(bad_img[0])[:120]}")
    bad_cat = [c for c in d["categories"] if not isinstance(c, dict) or not {"id", "name"} <= set(c)]
    if bad_cat:
        raise ValueError(f"annotation file {path!r}: category entries need id and name, e.g. {str(bad_cat[0])[:120]}")
    img_ids, cat_ids = {im["id"] for im in d["images"]}, {c["id"] for c in d["categories"]}
    problems: list[str] = []
    for a in d["annotations"]:
        if not isinstance(a, dict) or not {"image_id", "category_id", "bbox"} <= set(a):
            problems.append(f"an annotation lacks image_id/category_id/bbox: {str(a)[:100]}")
        elif a["image_id"] not in img_ids:
            problems.append(f"annotation {a.get('id')} refers to image id {a['image_id']}, which is not listed")
        elif a["category_id"] not in cat_ids:
            problems.append(f"annotation {a.get('id')} has category id {a['category_id']}, which is not listed")
        elif not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4
                  and all(isinstance(v, (int, float)) for v in a["bbox"])):
            problems.append(f"annotation {a.get('id')} has bbox {a['bbox']!r}, expected [x, y, width, height]")
        if problems:
            break
    if problems:
        raise ValueError(f"annotation file {path!r} is inconsistent: {problems[0]}")
    for a in d["annotations"]:   # COCOeval reads both; box-only files often leave them out
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return d


class _quiet:
    """pycocotools prints progress lines; keep test and CLI output clean."""

    def __enter__(self) -> None:
        import contextlib
        import io
        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
