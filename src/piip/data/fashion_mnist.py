"""Fashion-MNIST as real images for piip's evidence runs: the IDX reader, an ImageFolder writer for
classification, and "scenes" (garments pasted at many scales on textured canvases) written as a
COCO-format folder that the detection CLI and evaluation read unchanged.

The data come from the Debian package ``dataset-fashion-mnist`` (the original release's four IDX
files, 60k train / 10k test, 28x28 grey, 10 classes); nothing is downloaded here.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import struct
from typing import Optional

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_ROOT = "PIIP_FASHION_MNIST"
# folder-safe versions of the release's class names ("T-shirt/top", ..., "Ankle boot")
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as an array of its stored shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but {len(data) - header} "
                         f"bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}: install the Debian package "
        f"(`apt-get install dataset-fashion-mnist`, files in {DEFAULT_ROOT}) or point ${ENV_ROOT} / --fmnist-root "
        f"at a folder with the four IDX files of the original release")


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``split`` ('train' or 'test')."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or os.environ.get(ENV_ROOT) or DEFAULT_ROOT
    img_name, lab_name = _FILES[split]
    images, labels = read_idx(_find(root, img_name)), read_idx(_find(root, lab_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{root}: {split} labels outside 0..{len(CLASSES) - 1}")
    return images.astype(np.uint8), labels.astype(np.int64)


def write_image_folder(root: str, images: np.ndarray, labels: np.ndarray, per_class: Optional[int] = None) -> str:
    """``root/<class>/<index>.png`` at the native size (the first ``per_class`` of each class); returns root."""
    from PIL import Image
    counts = dict.fromkeys(range(len(CLASSES)), 0)
    for name in CLASSES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        lab = int(lab)
        if per_class is not None and counts[lab] >= per_class:
            continue
        counts[lab] += 1
        path = os.path.join(root, CLASSES[lab], f"{i:05d}.png")
        if not os.path.exists(path):
            Image.fromarray(img).save(path)
    return root


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured canvas: a smooth random colour field, stripes of random frequency and angle, noise."""
    import torch
    import torch.nn.functional as F
    cells = int(rng.integers(2, 7))
    field = torch.from_numpy(rng.uniform(0, 150, size=(1, 3, cells, cells)).astype(np.float32))
    field = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    field = field + stripes[..., None] * rng.uniform(0, 30, size=3).astype(np.float32)
    field = field + rng.normal(0, 12, size=field.shape).astype(np.float32)
    return np.clip(field, 0, 255)


def _garment(img: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A 28x28 garment resized to side x side: (intensity in [0, 1], mask of the garment's pixels)."""
    from PIL import Image
    g = np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    return g, g > 0.12


def make_scenes(root: str, split: str, images: np.ndarray, labels: np.ndarray, num_images: int,
                size: int = 256, objects: tuple[int, int] = (3, 12), scale: tuple[float, float] = (10, 160),
                large: tuple[float, float, float] = (0.25, 160, 240), min_visible: float = 0.5, seed: int = 0) -> str:
    """Write ``root/{split}/*.png`` and ``root/{split}.json`` (COCO instances); returns the JSON path.

    Each canvas gets ``objects`` garments (uniform count) whose square side is log-uniform in
    ``scale`` px, or with probability ``large[0]`` uniform in ``large[1:]`` px (a garment fills about
    40 % of its square, so only such sides give COCO-"large" masks of 96² px and more), tinted with a
    random colour, and pasted largest first. A garment may be partly covered by later ones, but a
    placement that would leave any garment (itself included) with less than ``min_visible`` of its
    pixels is redrawn (12 tries, then skipped), so every garment in a picture is annotated and
    recognisable. Masks are the visible garment pixels (RLE), boxes their extent.
    """
    from PIL import Image
    from pycocotools import mask as mask_utils
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    for name, (lo, hi) in (("scale", scale), ("large[1:]", large[1:])):
        if not 0 < lo <= hi <= size:
            raise ValueError(f"{name} ({lo}, {hi}) must satisfy 0 < min <= max <= size ({size})")
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    out_images, anns = [], []
    for i in range(num_images):
        canvas = _background(size, rng)
        owner = np.zeros((size, size), dtype=np.int32)        # which garment (1-based) shows at each pixel
        full_area: list[int] = []
        cats: list[int] = []
        sides = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            if rng.random() < large[0]:
                sides.append(int(round(rng.uniform(large[1], large[2]))))
            else:
                sides.append(int(round(math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))))))
        for side in sorted(sides, reverse=True):  # large first: small garments lie on top, as in photos
            for _try in range(12):
                k = int(rng.integers(len(images)))
                g, m = _garment(images[k], side)
                if m.sum() < 8:
                    continue
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                trial = owner.copy()
                trial[y:y + side, x:x + side][m] = len(full_area) + 1
                visible = np.bincount(trial.ravel(), minlength=len(full_area) + 2)[1:]
                areas = np.array(full_area + [int(m.sum())])
                if np.all(visible >= min_visible * areas):
                    break
            else:
                continue
            owner = trial
            full_area.append(int(m.sum()))
            cats.append(int(labels[k]))
            tint = rng.uniform(90, 255, size=3).astype(np.float32)
            patch = canvas[y:y + side, x:x + side]
            patch[m] = (tint[None] * (0.25 + 0.75 * g[m][:, None]))
        for j, cat in enumerate(cats):
            vis = owner == j + 1
            ys, xs = np.nonzero(vis)
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0 = int(xs.min()), int(ys.min())
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1, "segmentation": rle,
                         "area": int(vis.sum()), "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                         "iscrowd": 0})
        name = f"{i:06d}.png"
        Image.fromarray(canvas.astype(np.uint8)).save(os.path.join(img_dir, name))
        out_images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    categories = [{"id": c + 1, "name": n, "supercategory": "garment"} for c, n in enumerate(CLASSES)]
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": out_images, "annotations": anns, "categories": categories}, f)
    return path
