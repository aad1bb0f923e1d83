"""A small COCO-format set of shapes for tests and demos (no downloads).

Rectangles, ellipses and triangles from tiny (a few pixels) to large (half the image), on a
noisy background, never overlapping, each with its polygon segmentation; the rendered pixels
are exactly the polygon so box, mask and image agree.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Union

import numpy as np

CATEGORIES = [{"id": 1, "name": "rectangle", "supercategory": "shape"},
              {"id": 2, "name": "ellipse", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"}]


def _polygon(kind: int, cx: float, cy: float, w: float, h: float, rng: random.Random) -> list[tuple[float, float]]:
    if kind == 1:
        return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if kind == 2:
        n = 24
        return [(cx + w / 2 * math.cos(2 * math.pi * i / n), cy + h / 2 * math.sin(2 * math.pi * i / n)) for i in range(n)]
    apex = cx + (rng.random() - 0.5) * w
    return [(apex, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]


def make_coco(root: str, num_images: int = 16, image_size: Union[int, tuple[int, int]] = 128,
              max_objects: int = 4, min_object: int = 4, max_object_frac: float = 0.5, seed: int = 0,
              split: str = "train") -> str:
    """Write ``root/{split}/*.png`` and ``root/{split}.json``; returns the annotation path.

    Args:
        image_size: side, or (height, width).
        max_objects: up to this many shapes per image (at least one).
        min_object / max_object_frac: object sides range from ``min_object`` px to
            ``max_object_frac`` of the image side (log-uniform, so small objects are common).
    """
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(h, w) < 2 * min_object:
        raise ValueError(f"image_size {image_size} is too small for min_object={min_object}")
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    colours = {1: (220, 60, 60), 2: (60, 200, 80), 3: (70, 90, 230)}
    for i in range(num_images):
        bg = nrng.integers(0, 90, size=(h, w, 3), dtype=np.uint8) + nrng.integers(0, 60, size=(1, 1, 3), dtype=np.uint8)
        im = Image.fromarray(bg)
        draw = ImageDraw.Draw(im)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(rng.randint(1, max_objects)):
            for _try in range(30):
                kind = rng.randint(1, 3)
                hi = max(min_object + 1, max_object_frac * min(h, w))
                ow = math.exp(rng.uniform(math.log(min_object), math.log(hi)))
                oh = ow * rng.uniform(0.6, 1.6)
                oh = min(max(oh, min_object), min(h, w) - 2)
                cx, cy = rng.uniform(ow / 2 + 1, w - ow / 2 - 1), rng.uniform(oh / 2 + 1, h - oh / 2 - 1)
                box = (cx - ow / 2 - 1, cy - oh / 2 - 1, cx + ow / 2 + 1, cy + oh / 2 + 1)
                if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                    break
            else:
                continue
            poly = _polygon(kind, cx, cy, ow, oh, rng)
            jitter = tuple(int(c + rng.randint(-25, 25)) for c in colours[kind])
            draw.polygon(poly, fill=jitter)
            flat = [round(v, 2) for xy in poly for v in xy]
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
            area = float(mask_utils.area(rle))
            if area <= 0:
                continue
            xs, ys = flat[0::2], flat[1::2]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            bbox = [round(x0, 2), round(y0, 2), round(min(w, max(xs)) - x0, 2), round(min(h, max(ys)) - y0, 2)]
            placed.append(box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": kind, "segmentation": [flat],
                         "area": area, "bbox": bbox, "iscrowd": 0})
        name = f"{i:06d}.png"
        im.save(os.path.join(img_dir, name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    ann_path = os.path.join(root, f"{split}.json")
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    return ann_path


def make_image_folder(root: str, per_class: int = 32, image_size: int = 72, seed: int = 0,
                      split: str = "train") -> str:
    """Write an ImageFolder-style classification set ``root/{split}/{rectangle,ellipse,triangle}/*.png``:
    one shape per image (random size 25-60% of the side, position and colours, noisy background).
    Returns the split folder."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out = os.path.join(root, split)
    for cat in CATEGORIES:
        folder = os.path.join(out, cat["name"])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            bg = nrng.integers(0, 90, 3)
            arr = np.clip(bg + nrng.normal(0, 12, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            side = image_size * rng.uniform(0.25, 0.6)
            w, h = side * rng.uniform(0.7, 1.0), side * rng.uniform(0.7, 1.0)
            cx, cy = rng.uniform(w / 2, image_size - w / 2), rng.uniform(h / 2, image_size - h / 2)
            color = tuple(rng.randint(130, 255) for _ in range(3))
            ImageDraw.Draw(im).polygon(_polygon(cat["id"], cx, cy, w, h, rng), fill=color)
            im.save(os.path.join(folder, f"{i:05d}.png"))
    return out
