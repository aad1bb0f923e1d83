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
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(nh, nw))[:, 0].byte()
        elif "masks" in target:
            target["masks"] = target["masks"].new_zeros((0, nh, nw))
        return img, target


def detection_train_transforms(min_size: int, max_size: int, flip: float = 0.5) -> Compose:
    """The released training pipeline's geometric part: resize (keep ratio) + horizontal flip."""
    return Compose([Resize(min_size, max_size), RandomHorizontalFlip(flip)])


def detection_collate(batch: list) -> tuple[list[Tensor], list[Target]]:
    """Lists of images and targets (torchvision detectors pad inside); ``None`` samples are dropped."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]
