"""Zero padding of (N, H, W, ...) maps that writes each element once: ``F.pad`` fills the whole
output with zeros first and then copies the map over it."""
from __future__ import annotations

from torch import Tensor


def zero_padded(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """(N, H, W, *rest) -> (N, top + H + bottom, left + W + right, *rest), contiguous, with a zero
    border; only the border is zeroed. ``x`` may be any strided view (a permuted map is read in
    place)."""
    n, h, w, *rest = x.shape
    out = x.new_empty(n, top + h + bottom, left + w + right, *rest)
    out[:, :top].zero_()
    out[:, top + h:].zero_()
    out[:, top:top + h, :left].zero_()
    out[:, top:top + h, left + w:].zero_()
    out[:, top:top + h, left:left + w] = x
    return out
