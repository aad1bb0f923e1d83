"""Detection transforms on (image, target) pairs: image a float (3, H, W) RGB tensor in [0, 1],
target a dict with ``boxes`` (N, 4) xyxy, ``labels`` and optionally ``masks`` (N, H, W) uint8.

Normalisation and padding to the backbone's divisor happen inside the detector's transform
(:class:`piip.tasks.detection.PIIPDetectionTransform`) so that training, evaluation and
prediction share one definition; :class:`Resize` here only does the resize early, in the
data-loading workers (the detector's own resize is then the identity).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Any]


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        for t in self.transforms:
            img, target = t(img, target, rng)
        return img, target


class RandomHorizontalFlip:
    """Flip image, boxes and masks with probability ``p`` (drawn from ``rng`` for reproducible resumes)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        if (rng or random).random() >= self.p:
            return img, target
        w = img.shape[-1]
        img = img.flip(-1)
        target = dict(target)
        if "boxes" in target and len(target["boxes"]):
            b = target["boxes"].clone()
            b[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = b
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return img, target


class Resize:
    """Keep-ratio resize with ``scale = min(max_size / long, min_size / short)`` (mmdet / torchvision rule)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        if min_size <= 0 or max_size <= 0:
            raise ValueError(f"Resize needs positive sizes, got min_size={min_size}, max_size={max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        h, w = img.shape[-2:]
        scale = min(self.max_size / max(h, w), self.min_size / min(h, w))
        # same size arithmetic as torchvision's transform (floor of h*scale), so it is a no-op there
        img = F.interpolate(img[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                            align_corners=False)[0]
        nh, nw = img.shape[-2:]
        target = dict(target)
        if "boxes" in target:
            ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
            target["boxes"] = target["boxes"] * ratio
        if "masks" in target and target["masks"].numel():
            # nearest-exact: pixel centres map like the bilinear image resize (plain nearest shifts by half a pixel)
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(nh, nw),
                                            mode="nearest-exact")[:, 0].byte()
        elif "masks" in target:
            target["masks"] = target["masks"].new_zeros((0, nh, nw))
        return img, target


def detection_train_transforms(min_size: int, max_size: int, flip: float = 0.5) -> Compose:
    """The released training pipeline's geometric part: resize (keep ratio) + horizontal flip."""
    return Compose([Resize(min_size, max_size), RandomHorizontalFlip(flip)])


class RandomChoiceResize:
    """Keep-ratio :class:`Resize` to a short side drawn from ``short_sides``, long side capped at
    ``max_size`` (mmdet ``Resize(img_scale=[(max_size, s), ...], multiscale_mode='value')``)."""

    def __init__(self, short_sides: Sequence[int], max_size: int) -> None:
        if not short_sides:
            raise ValueError("RandomChoiceResize needs at least one short side")
        self.resizes = [Resize(int(s), int(max_size)) for s in short_sides]

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        return (rng or random).choice(self.resizes)(img, target, rng)


class RandomCrop:
    """mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: a crop of height and
    width each drawn from [min(side, lo), min(side, hi)] at a random position; boxes are shifted and
    clipped to it and boxes (with their masks) left with no area are dropped; a crop with no box left
    is kept (a negative image)."""

    def __init__(self, lo: int, hi: int) -> None:
        if not 0 < lo <= hi:
            raise ValueError(f"RandomCrop needs 0 < lo <= hi, got ({lo}, {hi})")
        self.lo, self.hi = int(lo), int(hi)

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        r = rng or random
        h, w = img.shape[-2:]
        ch = r.randint(min(h, self.lo), min(h, self.hi))
        cw = r.randint(min(w, self.lo), min(w, self.hi))
        y0, x0 = r.randint(0, h - ch), r.randint(0, w - cw)
        img = img[..., y0:y0 + ch, x0:x0 + cw]
        target = dict(target)
        keep = None
        if "boxes" in target:
            b = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=target["boxes"].dtype)
            b[:, 0::2] = b[:, 0::2].clamp(0, cw)
            b[:, 1::2] = b[:, 1::2].clamp(0, ch)
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            target["boxes"] = b[keep]
            if "labels" in target:
                target["labels"] = target["labels"][keep]
        if "masks" in target:
            m = target["masks"][:, y0:y0 + ch, x0:x0 + cw]
            target["masks"] = m[keep] if keep is not None else m
        return img, target


class RandomPolicy:
    """One of several pipelines, equiprobably (mmdet ``AutoAugment`` over geometric policies)."""

    def __init__(self, policies: Sequence[Callable]) -> None:
        self.policies = list(policies)

    def __call__(self, img: Tensor, target: Target, rng: Optional[random.Random] = None) -> tuple[Tensor, Target]:
        return (rng or random).choice(self.policies)(img, target, rng)


def detection_ms_transforms(finest: int, flip: float = 0.5) -> Compose:
    """The released "ms" training pipeline (DETR AutoAugment, vision_spec D.3), scaled by
    k = finest / 1024: flip; then either a resize to a short side in k * (480, 512, ..., 800) with the
    long side capped at k * 1333, or a resize to k * (400, 500, 600), a random crop of k * [384, 600]
    and the first resize; finally a random crop to at most k * 1024 (= the finest resolution) a side."""
    k = finest / 1024
    long = int(1333 * k)                                  # int(): the released configs' rounding
    scales = [int(s * k) for s in range(480, 801, 32)]
    policy1 = RandomChoiceResize(scales, long)
    policy2 = Compose([RandomChoiceResize([int(s * k) for s in (400, 500, 600)], long),
                       RandomCrop(int(384 * k), int(600 * k)), RandomChoiceResize(scales, long)])
    side = int(1024 * k)
    return Compose([RandomHorizontalFlip(flip), RandomPolicy([policy1, policy2]), RandomCrop(side, side)])


def detection_collate(batch: list) -> tuple[list[Tensor], list[Target]]:
    """Lists of images and targets (torchvision detectors pad inside); ``None`` samples are dropped."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]
