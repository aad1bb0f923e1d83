"""Semantic segmentation data: ADE20K layout, a generic image-folder + PNG-mask-folder layout, the
released mmseg ADE20K training pipeline and the test-time resize, and a synthetic set generator.

Images are returned as float RGB (3, H, W) in [0, 1] (normalisation happens inside the segmentor),
masks as int64 (H, W) with class ids ``0..K-1`` and 255 = ignore.

Layouts:

* ADE20K (``ADEChallengeData2016``): ``ROOT/images/{training,validation}/*.jpg`` and
  ``ROOT/annotations/{training,validation}/*.png``; mask value 0 is "other" and
  ``reduce_zero_label`` maps 0 -> 255 and v -> v - 1 (150 classes).
* folder: any image folder, a mask folder with ``STEM.png`` per image, and a class list (a text
  file with one name per line, or names given directly); mask values are class ids, 255 = ignore.

An image without a mask is left out with one warning; an unreadable image or mask is skipped with a
warning (replaced by the next good sample in training, left out in evaluation); a mask value that is
neither a class id nor 255 is an error naming the file and the value.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .robust import check_on_error, load_or_substitute, transform_sample

IGNORE_INDEX = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ADE20K_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

ADE20K_CLASSES = [
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag']


class MaskValueError(ValueError):
    """A mask holds a value that is neither a class id nor the ignore index."""


def read_mask(path: str) -> np.ndarray:
    """uint8-or-wider (H, W) array of a label PNG (palette / grey; RGB is refused: it holds colours)."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask {path!r} does not exist")
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise ValueError(f"mask {path!r} is a colour ({im.mode}) image; masks must be single-channel "
                                 "(mode L, P or I) PNGs holding class ids")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise ValueError(f"mask {path!r} is not an image Pillow can read") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"mask {path!r} is damaged and cannot be decoded ({e})") from None
    if arr.ndim != 2:
        raise ValueError(f"mask {path!r} has shape {arr.shape}; expected (H, W)")
    return arr


def read_class_names(spec: Union[str, Sequence[str], None]) -> Optional[list[str]]:
    """A class list: a text file (one name per line), a comma-separated string, or a sequence."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                names = [ln.strip() for ln in f if ln.strip()]
        elif os.path.sep in spec or spec.endswith(".txt"):
            raise FileNotFoundError(f"class list file {spec!r} does not exist")
        else:
            names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s) for s in spec]
    if not names:
        raise ValueError(f"class list {spec!r} is empty")
    if len(names) >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} classes are supported (255 is the ignore index), got {len(names)}")
    return names


class SegmentationDataset(Dataset):
    """(image, mask) pairs from an image folder and a mask folder (masks ``STEM.png``)."""

    def __init__(self, img_dir: str, ann_dir: str, class_names: Union[str, Sequence[str]],
                 reduce_zero_label: bool = False, transforms: Optional[Callable] = None,
                 on_error: str = "substitute", seed: int = 0) -> None:
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"image folder not found: {img_dir}")
        if not os.path.isdir(ann_dir):
            raise FileNotFoundError(f"mask folder not found: {ann_dir}")
        check_on_error(on_error)
        self.class_names = read_class_names(class_names)
        self.num_classes = len(self.class_names)
        self.img_dir, self.ann_dir, self.reduce_zero_label = img_dir, ann_dir, reduce_zero_label
        self.transforms, self.on_error, self.seed, self.epoch = transforms, on_error, seed, 0
        images = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(IMAGE_EXTS)
                        and os.path.isfile(os.path.join(img_dir, f)))
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {img_dir}")
        pairs, missing = [], []
        for f in images:
            mask = os.path.join(ann_dir, os.path.splitext(f)[0] + ".png")
            (pairs if os.path.isfile(mask) else missing).append((os.path.join(img_dir, f), mask))
        if missing:
            if not pairs:
                raise ValueError(f"none of the {len(images)} images in {img_dir} has a mask STEM.png in {ann_dir} "
                                 f"(e.g. {os.path.basename(missing[0][1])!r})")
            warnings.warn(f"{ann_dir}: skipping {len(missing)} of {len(images)} images without a mask "
                          f"(e.g. {os.path.basename(missing[0][1])!r})", stacklevel=2)
        self.samples = pairs
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index): identical after a resume."""
        self.epoch = epoch

    def load(self, i: int) -> tuple[Tensor, Tensor]:
        """Image uint8 (3, H, W) and mask int64 (H, W) after ``reduce_zero_label``, checked."""
        from .images import read_rgb
        img_path, mask_path = self.samples[i]
        img = read_rgb(img_path)
        m = read_mask(mask_path).astype(np.int64)
        if m.shape != tuple(img.shape[1:]):
            raise ValueError(f"mask {mask_path!r} is {m.shape[1]}x{m.shape[0]}, its image "
                             f"{img.shape[2]}x{img.shape[1]}")
        if self.reduce_zero_label:
            m = np.where(m == 0, IGNORE_INDEX + 1, m) - 1      # 0 -> 255, v -> v - 1, 255 stays ignored
            m[m == IGNORE_INDEX - 1] = IGNORE_INDEX            # (mmseg: 254 -> 255 after the shift)
        bad = (m != IGNORE_INDEX) & ((m < 0) | (m >= self.num_classes))
        if bad.any():
            v = int(m[bad][0]) + (1 if self.reduce_zero_label else 0)
            raise MaskValueError(f"mask {mask_path!r} holds value {v}, not a class id of the {self.num_classes} "
                                 f"classes{' after reduce_zero_label (1..%d)' % self.num_classes if self.reduce_zero_label else ' (0..%d)' % (self.num_classes - 1)}"
                                 f" nor {IGNORE_INDEX} (ignore)")
        return img, torch.from_numpy(m)

    def __getitem__(self, index: int):
        found = load_or_substitute(index, len(self.samples), self.load,
                                   lambda i: f"sample {os.path.basename(self.samples[i][0])!r}", self._bad,
                                   self.on_error, f"{self.img_dir} and {self.ann_dir}", fatal=(MaskValueError,))
        if found is None:
            return None
        i, (img, mask) = found
        img = img.float().div_(255)
        if self.transforms is not None:
            img, mask = transform_sample(self.transforms, (img, mask, random.Random(hash((self.seed, self.epoch, i)))),
                                         f"sample {i} ({self.samples[i][0]})")
        return img, mask


def ade20k(root: str, split: str = "train", transforms: Optional[Callable] = None, **kw) -> SegmentationDataset:
    """``ADEChallengeData2016``-layout split (``train``/``val``) with ``reduce_zero_label`` and 150 names."""
    if split not in ADE20K_SPLITS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ADE20K folder not found: {root}")
    sub = ADE20K_SPLITS[split]
    kw.setdefault("class_names", ADE20K_CLASSES)
    kw.setdefault("reduce_zero_label", True)
    return SegmentationDataset(os.path.join(root, "images", sub), os.path.join(root, "annotations", sub),
                               transforms=transforms, **kw)


# ---------------------------------------------------------------------- transforms
def _resize(img: Tensor, mask: Optional[Tensor], h: int, w: int) -> tuple[Tensor, Optional[Tensor]]:
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return img, mask


class SegTrainTransform:
    """The released ADE20K training pipeline (mmseg ``Resize(img_scale, ratio_range)`` ->
    ``RandomCrop(crop, cat_max_ratio)`` -> ``RandomFlip`` -> ``PhotoMetricDistortion`` -> ``Pad``).

    ``img_scale`` (long, short) defaults to ``(4 * crop, crop)`` (released 2048x512 for crop 512).
    Photometric distortion: brightness +-32/255, contrast x0.5-1.5 (before or after the colour
    steps), saturation x0.5-1.5 and hue +-18/180 of a turn, each with probability 1/2; saturation
    and hue use torchvision's ``adjust_saturation`` / ``adjust_hue``. Padding is 0 for the image
    (in [0, 1] space; mmseg pads after normalising) and 255 (ignored) for the mask.
    """

    def __init__(self, crop_size: int, img_scale: Optional[tuple[int, int]] = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < lo <= hi, got {ratio_range}")
        self.crop = crop_size
        self.img_scale = img_scale or (4 * crop_size, crop_size)
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric

    def __call__(self, img: Tensor, mask: Tensor, rng: Optional[random.Random] = None) -> tuple[Tensor, Tensor]:
        rng = rng or random.Random()
        # random rescale, keeping the aspect ratio within (long, short) x ratio
        r = rng.uniform(*self.ratio_range)
        long_, short = self.img_scale[0] * r, self.img_scale[1] * r
        h, w = img.shape[-2:]
        s = min(long_ / max(h, w), short / min(h, w))
        img, mask = _resize(img, mask, max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        # random crop: up to 10 tries for one where no class covers more than cat_max_ratio
        h, w = img.shape[-2:]
        ch, cw = min(self.crop, h), min(self.crop, w)

        def window() -> tuple[int, int]:
            return rng.randint(0, h - ch), rng.randint(0, w - cw)

        y, x = window()
        if self.cat_max_ratio < 1:
            for _ in range(10):
                m = mask[y:y + ch, x:x + cw]
                _, cnt = torch.unique(m[m != IGNORE_INDEX], return_counts=True)
                if len(cnt) > 1 and cnt.max().item() / cnt.sum().item() < self.cat_max_ratio:
                    break
                y, x = window()
        img, mask = img[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]
        if rng.random() < self.flip_prob:
            img, mask = img.flip(-1), mask.flip(-1)
        if self.photometric:
            img = photometric_distortion(img, rng)
        ph, pw = self.crop - img.shape[1], self.crop - img.shape[2]
        if ph > 0 or pw > 0:
            img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            mask = F.pad(mask, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        return img.contiguous(), mask.contiguous()


def photometric_distortion(img: Tensor, rng: random.Random) -> Tensor:
    """mmseg ``PhotoMetricDistortion`` on float RGB in [0, 1] (see :class:`SegTrainTransform`)."""
    import torchvision.transforms.functional as TF
    if rng.randint(0, 1):
        img = (img + rng.uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = rng.randint(0, 1)

    def contrast(x: Tensor) -> Tensor:
        return (x * rng.uniform(0.5, 1.5)).clamp(0, 1) if rng.randint(0, 1) else x

    if contrast_first:
        img = contrast(img)
    if rng.randint(0, 1):
        img = TF.adjust_saturation(img, rng.uniform(0.5, 1.5))
    if rng.randint(0, 1):
        img = TF.adjust_hue(img, rng.uniform(-18, 18) / 180)
    if not contrast_first:
        img = contrast(img)
    return img


class SegTestTransform:
    """Short side := ``size`` keeping the ratio, no long-side cap (mmseg ``SETR_Resize``); the mask
    stays at its original size (metrics are computed there, as mmseg does)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"test size must be >= 1, got {size}")
        self.size = size

    def __call__(self, img: Tensor, mask: Tensor, rng: Optional[random.Random] = None) -> tuple[Tensor, Tensor]:
        h, w = img.shape[-2:]
        s = self.size / min(h, w)
        img, _ = _resize(img, None, max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        return img, mask


def segmentation_collate(batch: list) -> tuple[Tensor, Tensor]:
    """Stack (image, mask) pairs of equal size (training crops); ``None`` samples are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


# ---------------------------------------------------------------------- synthetic set
SYNTHETIC_CLASSES = ["background", "rectangle", "ellipse", "triangle"]


def make_segmentation(root: str, num_images: int = 8, image_size: Union[int, tuple[int, int]] = 64,
                      layout: str = "ade20k", split: str = "train", max_objects: int = 3, seed: int = 0) -> str:
    """A small set of coloured shapes on a noisy background with their class masks (no downloads).

    ``layout='ade20k'``: ``root/images/{training|validation}/*.jpg`` + ``root/annotations/.../*.png``
    with 0 = "other" (use ``reduce_zero_label``: classes rectangle / ellipse / triangle) and a
    ``root/classes.txt``. ``layout='folder'``: ``root/{split}/images/*.png`` +
    ``root/{split}/masks/*.png`` with 0 = background (4 classes in ``root/classes.txt``).
    Returns the root. The ADE20K layout writes JPEG images (as the real set), the folder layout PNG.
    """
    from PIL import Image, ImageDraw
    if layout not in ("ade20k", "folder"):
        raise ValueError(f"layout must be 'ade20k' or 'folder', got {layout!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(h, w) < 16:
        raise ValueError(f"image_size {image_size} is too small (at least 16 px)")
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    if layout == "ade20k":
        sub = ADE20K_SPLITS.get(split, split)
        img_dir, ann_dir, ext = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub), ".jpg"
        names = SYNTHETIC_CLASSES[1:]
    else:
        img_dir, ann_dir, ext = os.path.join(root, split, "images"), os.path.join(root, split, "masks"), ".png"
        names = SYNTHETIC_CLASSES
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    colours = {1: (220, 60, 60), 2: (60, 200, 80), 3: (70, 90, 230)}
    for i in range(num_images):
        bg = nrng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(bg)
        mask = Image.new("L", (w, h), 0)
        draw, mdraw = ImageDraw.Draw(im), ImageDraw.Draw(mask)
        for _ in range(rng.randint(1, max_objects)):
            kind = rng.randint(1, 3)
            bw, bh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.2, 0.6) * h
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = [x0, y0, x0 + bw, y0 + bh]
            for d, fill in ((draw, colours[kind]), (mdraw, kind)):
                if kind == 1:
                    d.rectangle(box, fill=fill)
                elif kind == 2:
                    d.ellipse(box, fill=fill)
                else:
                    d.polygon([(x0 + bw / 2, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)], fill=fill)
        stem = f"{split}_{i:06d}"
        im.save(os.path.join(img_dir, stem + ext), **({"quality": 95} if ext == ".jpg" else {}))
        mask.save(os.path.join(ann_dir, stem + ".png"))
    return root
