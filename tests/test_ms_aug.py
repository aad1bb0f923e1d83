"""The released "ms" training pipeline (flip, AutoAugment of two resize / crop policies, final crop)."""
from __future__ import annotations

import random

import torch

from piip.data import RandomCrop, detection_ms_transforms


def scene(h: int = 90, w: int = 120):
    """An image whose first channel is each object's id / 10 inside its mask, with boxes = mask extents."""
    img = torch.zeros(3, h, w)
    img[1:] = torch.rand(2, h, w)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # no one-pixel tips (nearest-neighbour mask resizing may drop those): an ellipse cut by its box
    shapes = [(((xx - 30) ** 2 / 400 + (yy - 30) ** 2 / 225) <= 1.44) & ((xx - 30).abs() <= 20) & ((yy - 30).abs() <= 15),
              (xx >= 60) & (xx < 110) & (yy >= 10) & (yy < 40),             # rectangle
              (xx >= 10) & (xx < 100) & (yy >= 55) & (yy < 85) & ~((xx >= 55) & (yy >= 70))]  # L shape
    masks = torch.stack(shapes).to(torch.uint8)
    boxes = []
    for i, m in enumerate(shapes):
        img[0][m] = (i + 1) / 10
        ys, xs = torch.where(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return img, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 2, 3]), "masks": masks}


def test_ms_pipeline_keeps_boxes_masks_and_image_consistent():
    img, target = scene()
    tf = detection_ms_transforms(finest=96)             # k = 96 / 1024: short sides 45..75, crops to <= 96
    sizes = set()
    for seed in range(12):
        out, t = tf(img, target, random.Random(seed))
        h, w = out.shape[-2:]
        sizes.add((h, w))
        assert h <= 96 and w <= 96
        assert t["masks"].shape == (len(t["boxes"]), h, w) and len(t["labels"]) == len(t["boxes"])
        for box, mask, label in zip(t["boxes"], t["masks"], t["labels"]):
            ys, xs = torch.where(mask > 0)
            if len(ys) < 4:
                continue
            extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (extent - box).abs().max() <= 1.5, (seed, box, extent)
            # the image under the mask shows this object (its id in channel 0), also after flips
            assert (out[0][mask > 0] - label / 10).abs().median() < 0.02
    assert len(sizes) > 4                                 # several scales / crops


def test_scales_follow_the_finest_resolution():
    tf = detection_ms_transforms(finest=1792)            # DINO SBL: k = 1.75, as its released config
    flip, policies, final = tf.transforms
    p1, p2 = policies.policies
    assert [r.min_size for r in p1.resizes] == list(range(840, 1401, 56)) and p1.resizes[0].max_size == 2332
    assert [r.min_size for r in p2.transforms[0].resizes] == [700, 875, 1050]
    assert (p2.transforms[1].lo, p2.transforms[1].hi) == (672, 1050)
    assert (final.lo, final.hi) == (1792, 1792) and flip.p == 0.5


def test_random_crop_drops_boxes_outside_and_keeps_negative_crops():
    img, target = scene()
    target = {k: v[1:2] for k, v in target.items()}     # the rectangle only: many crops miss it
    crop = RandomCrop(20, 20)
    negatives = 0
    for seed in range(30):
        out, t = crop(img, target, random.Random(seed))
        assert out.shape[-2:] == (20, 20)
        b = t["boxes"]
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all() and (b >= 0).all() and (b <= 20).all()
        assert t["masks"].shape[0] == len(b) == len(t["labels"])
        negatives += len(b) == 0
    assert 0 < negatives < 30
