"""Window partitioning for ViTDet-style windowed attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .symbolic import concrete


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window * window, C), zero-padding H, W up to the window.

    Returns the windows and the padded size (Hp, Wp). The padded size is written as
    ``ceil(H / window) * window`` so that, with symbolic sizes, the window split is a plain
    product the tracer verifies at once (and padding by 0 is kept rather than guarded on).
    """
    b, h, w, c = x.shape
    nh, nw = (h + window - 1) // window, (w + window - 1) // window
    hp, wp = nh * window, nw * window
    if not concrete((h, w)) or hp != h or wp != w:
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.view(b, nh, window, nw, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
    return x, (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window², C) -> (B, H, W, C), padding cropped."""
    hp, wp = padded
    h, w = size
    c = windows.shape[-1]
    nh, nw = hp // window, wp // window
    x = windows.view(-1, nh, nw, window, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], hp, wp, c)
    if not concrete((hp, wp, h, w)) or hp != h or wp != w:
        # narrow, not x[:, :h, :w]: a slice clamps its end (min(Hp, H)), which a tracer would guard on;
        # symbolic sizes also copy, so that no later reshape asks whether Hp == H (a guard on the size)
        x = x.narrow(1, 0, h).narrow(2, 0, w)
        if not concrete((hp, wp, h, w)):
            x = x.clone(memory_format=torch.contiguous_format)
    return x
