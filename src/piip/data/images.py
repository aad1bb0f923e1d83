"""Reading images from disk with one clear error for every way a file can be unusable."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor


def read_rgb(path: str) -> Tensor:
    """uint8 ``(3, H, W)`` RGB of an image file (any format Pillow reads; grey and RGBA converted).

    Raises FileNotFoundError for a missing file and ValueError for a folder, an empty, corrupt,
    truncated or non-image file, each naming the path.
    """
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"image {path!r} is a folder, not an image file")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"image {path!r} is not an image Pillow can read (corrupt, empty or another file "
                         "type)") from None
    except (OSError, SyntaxError, ValueError) as e:   # truncated data, bad headers
        raise ValueError(f"image {path!r} is damaged and cannot be decoded ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
