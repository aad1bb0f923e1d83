"""The PIIP-LLaVA image processor: a transformers ``BaseImageProcessor`` (so ``AutoImageProcessor``,
``AutoProcessor`` and the ``image-text-to-text`` pipeline find it), with the released preprocessing.

The pixels are computed with PIL + torch, not with a transformers backend: the released models
were trained with CLIPImageProcessor's PIL path (pad to square, bicubic shortest-edge resize,
centre crop), which the v5 backends no longer reproduce bit for bit (llava_spec §1.4).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .configuration import IMAGENET_MEAN, IMAGENET_STD, PAD_COLOR


def expand2square(img: Any, color: Sequence[int]) -> Any:
    """Paste ``img`` centred on a square canvas of ``color`` (the official pad preprocessing)."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(color))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _to_pil(img: Any) -> Any:
    """PIL images pass; uint8 HWC / CHW arrays or tensors are converted (what the pipeline may hand us)."""
    from PIL import Image
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, str):
        from transformers.image_utils import load_image
        return load_image(img)
    import numpy as np
    a = img.detach().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be a PIL image or an HxWx3 / 3xHxW array, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.max() > 1.0 + 1e-6 or a.min() < 0:
            raise ValueError("a float image array must hold values in [0, 1] (or pass uint8 / PIL images)")
        a = (a * 255).round().astype(np.uint8)
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)


class PiipLlavaImageProcessor(BaseImageProcessor):
    """RGB -> (pad to square) -> bicubic resize of the shortest edge to ``size`` -> centre crop -> /255
    -> ImageNet normalisation (the official CLIPImageProcessor settings, llava_spec §1.4).

    Calling it returns a :class:`BatchFeature` with ``pixel_values`` (B, 3, size, size), as every
    transformers image processor; :meth:`pixel_values` returns the tensor itself."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 336, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, pad: bool = True,
                 pad_color: Sequence[int] = PAD_COLOR, **kwargs: Any) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if isinstance(size, dict):  # a transformers-style size dict
            size = size.get("shortest_edge") or size.get("height")
        self.size, self.pad = int(size), bool(pad)
        self.image_mean, self.image_std, self.pad_color = list(image_mean), list(image_std), list(pad_color)

    def preprocess_one(self, img: Any) -> Tensor:
        from PIL import Image
        img = _to_pil(img).convert("RGB")
        if self.pad:
            img = expand2square(img, self.pad_color)
        w, h = img.size
        s = self.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(s, s, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (x - mean) / std

    def pixel_values(self, images: Any) -> Tensor:
        """One image or a (possibly nested, one list per prompt) list of images -> (B, 3, S, S)."""
        flat = list(_flatten(images))
        if not flat:
            raise ValueError("no image given: pass a PIL image or a list of them")
        return torch.stack([self.preprocess_one(im) for im in flat])

    def preprocess(self, images: Any, return_tensors: Optional[str] = None, **kwargs: Any) -> BatchFeature:
        if kwargs:
            unknown = sorted(k for k, v in kwargs.items() if v is not None)
            if unknown:
                raise ValueError(f"PiipLlavaImageProcessor takes no options {unknown}: its size, mean, std and "
                                 "padding are the model's (set them when building it)")
        return BatchFeature({"pixel_values": self.pixel_values(images)}, tensor_type=return_tensors)

    def blank(self) -> Tensor:
        """The zero image a text-only sample gets (normalised zeros, as the official collator)."""
        return torch.zeros(3, self.size, self.size)


def _flatten(images: Any):
    if isinstance(images, (list, tuple)):
        for im in images:
            yield from _flatten(im)
    elif images is not None:
        yield images
