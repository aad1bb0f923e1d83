"""Image classification data: ImageFolder-style folders or "path,label" lists (CSV / JSON), and
the released (timm / DeiT) training and evaluation transforms.

Unreadable images (corrupt, truncated, missing, not an image) are skipped: each gives one
warning naming the file and the reason (from :func:`piip.data.images.read_rgb`), and is counted
in ``dataset.skipped``; :func:`classification_collate` drops them from the batch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import read_rgb
from .robust import transform_sample
from ..config import IMAGENET_MEAN, IMAGENET_STD

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageClassification(Dataset):
    """``(image, label)`` samples of a class-per-sub-folder directory or a list file.

    Args:
        source: a folder whose sub-folders are the classes (sorted names = label order), or a
            ``.csv`` file (``path,label`` rows, an optional header) or ``.json`` file (a list of
            ``[path, label]`` pairs or ``{"path": ..., "label": ...}`` objects). Labels in a list
            may be class names or integer indices; relative paths are relative to the list's folder.
        transform: applied to the PIL RGB image (e.g. :func:`build_transforms`'s output).
        class_names: the label order to use (e.g. the training set's, for a validation set); a
            class of ``source`` outside it is an error.
        seed: when set, the random augmentation of a sample is a function of (seed, epoch, index)
            only (see :meth:`set_epoch`), so a resumed run sees the same augmented images in any
            number of loader workers; the caller's random state is left untouched.
    """

    def __init__(self, source: str, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, seed: Optional[int] = None) -> None:
        if not os.path.exists(source):
            raise FileNotFoundError(f"data {source!r} does not exist (give a folder with one sub-folder per class, "
                                    "or a .csv/.json list of path,label)")
        self.source, self.transform = source, transform
        if os.path.isdir(source):
            samples, names = _scan_folder(source)
        else:
            samples, names = _read_list(source)
        if class_names is not None:
            known = {n: i for i, n in enumerate(class_names)}
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ValueError(f"{source}: {len(unknown)} class(es) unknown to the training set: "
                                 f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
            samples = [(p, known[names[y]]) for p, y in samples]
            names = list(class_names)
        if not samples:
            raise ValueError(f"{source}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
        self.samples, self.class_names = samples, list(names)
        self.skipped: set[str] = set()
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):  # noqa: ANN201 - a PIL image or None
        from PIL import Image
        path, _ = self.samples[index]
        try:
            arr = read_rgb(path)
        except (ValueError, FileNotFoundError) as e:
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
            return None
        return Image.fromarray(arr.permute(1, 2, 0).numpy())

    def __getitem__(self, index: int) -> Optional[tuple[Tensor, int]]:
        # index >= len: copy index // len of sample index % len (repeated augmentation), own augmentation
        aug_index, index = index, index % len(self.samples)
        img = self.load(index)
        if img is None:
            return None
        if self.transform is not None:
            sample = f"sample {index} ({self.samples[index][0]})"
            if self.seed is None:
                img = transform_sample(self.transform, (img,), sample)
            else:
                seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + aug_index
                img = _seeded(lambda im: transform_sample(self.transform, (im,), sample), img, seed)
        return img, self.samples[index][1]


def _seeded(fn: Callable, img, seed: int):  # noqa: ANN001, ANN202
    """``fn(img)`` with Python's, numpy's and torch's RNGs seeded by ``seed``, restored afterwards
    (timm's RandAugment draws from numpy and Python, its crops and erasing from Python and torch)."""
    import random

    import numpy as np
    py, npst = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % 2**63)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return fn(img)
    finally:
        random.setstate(py)
        np.random.set_state(npst)


def _scan_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class sub-folders (expected {root}/CLASS_NAME/IMAGE files)")
    samples, empty = [], []
    for i, name in enumerate(names):
        files = []
        for dirpath, _, fnames in os.walk(os.path.join(root, name), followlinks=True):
            files += [os.path.join(dirpath, f) for f in fnames if f.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            empty.append(name)
        samples += [(f, i) for f in sorted(files)]
    if empty:
        warnings.warn(f"{root}: {len(empty)} class folder(s) hold no images: {empty[:5]}"
                      f"{' ...' if len(empty) > 5 else ''} (kept as classes without samples)", stacklevel=3)
    return samples, names


def _read_list(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    base = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str]] = []
    if path.lower().endswith(".json"):
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of [path, label] pairs or {{path, label}} objects")
        for i, r in enumerate(data):
            if isinstance(r, dict) and "path" in r and "label" in r:
                rows.append((str(r["path"]), str(r["label"])))
            elif isinstance(r, (list, tuple)) and len(r) == 2:
                rows.append((str(r[0]), str(r[1])))
            else:
                raise ValueError(f"{path}: entry {i} is {r!r}, expected [path, label] or {{\"path\": ..., \"label\": ...}}")
    elif path.lower().endswith((".csv", ".txt")):
        with open(path, newline="") as f:
            for i, r in enumerate(csv.reader(f)):
                if not r or not "".join(r).strip():
                    continue
                if len(r) != 2:
                    raise ValueError(f"{path}: line {i + 1} has {len(r)} fields, expected path,label")
                if i == 0 and [c.strip().lower() for c in r] == ["path", "label"]:
                    continue
                rows.append((r[0].strip(), r[1].strip()))
    else:
        raise ValueError(f"data {path!r} is neither a folder nor a .csv / .json list")
    rows = [(p if os.path.isabs(p) else os.path.join(base, p), y) for p, y in rows]
    if rows and all(y.lstrip("-").isdigit() for _, y in rows):
        ids = sorted({int(y) for _, y in rows})
        if ids[0] < 0:
            raise ValueError(f"{path}: negative label {ids[0]}")
        names = [str(i) for i in range(ids[-1] + 1)]
        return [(p, int(y)) for p, y in rows], names
    names = sorted({y for _, y in rows})
    index = {n: i for i, n in enumerate(names)}
    return [(p, index[y]) for p, y in rows], names


def classification_collate(batch: list) -> tuple[Tensor, Tensor]:
    """Stack images and labels; unreadable (``None``) samples are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


def build_transforms(input_size: int, train: bool, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                     re_prob: float = 0.0, color_jitter: float = 0.3, crop_ratio: float = 1.0,
                     crop_scale: float = 0.08,
                     interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Callable:
    """Training: timm's ``create_transform`` (RandomResizedCrop ``crop_scale``-1 (released 0.08), flip,
    RandAugment with its ops guarded by :func:`piip.data.augment.guard_augment_ops`, random erasing) at
    ``input_size`` (the finest branch's resolution). Evaluation: resize the short side to
    ``int(input_size / crop_ratio)`` and centre-crop ``input_size`` (released ratio 1.0)."""
    from torchvision import transforms as T
    if train:
        from timm.data import create_transform

        from .augment import guard_augment_ops
        try:
            tf = create_transform(input_size, is_training=True, auto_augment=auto_augment or None,
                                  scale=(crop_scale, 1.0), color_jitter=color_jitter, re_prob=re_prob, re_mode="pixel",
                                  re_count=1, interpolation=interpolation, mean=tuple(mean), std=tuple(std))
        except AssertionError as e:   # timm asserts on an unknown policy name
            raise ValueError(f"--auto-augment {auto_augment!r}: {e} (use a timm policy such as "
                             "'rand-m9-mstd0.5-inc1', 'original', 'augmix-m5-w3', or 'none')") from None
        return guard_augment_ops(tf)
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {crop_ratio}")
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([T.Resize(int(math.floor(input_size / crop_ratio)), interpolation=mode),
                      T.CenterCrop(input_size), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
