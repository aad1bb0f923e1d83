"""The interface every branch (ViT today; ConvNeXt, CLIP, InternViT later) implements.

A branch turns its view of the image into tokens, then runs one *group* of its blocks at a
time so that the backbone can interleave interactions. Token width and stride may change
from group to group (hierarchical CNN branches), hence ``group_dims``/``group_strides``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn


class Tokens(NamedTuple):
    """A branch's state: patch tokens (B, H*W, C) on an (H, W) grid, plus an optional class token."""

    x: Tensor
    hw: tuple[int, int]
    cls: Optional[Tensor] = None


class Branch(nn.Module):
    """Abstract branch. Subclasses set ``group_dims``, ``group_strides`` and ``name``."""

    name: str = "branch"
    group_dims: list[int]
    group_strides: list[int]

    @property
    def num_groups(self) -> int:
        return len(self.group_dims)

    @property
    def out_dim(self) -> int:
        return self.group_dims[-1]

    def check_input(self, h: int, w: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, img: Tensor) -> Tokens:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_group(self, tokens: Tokens, group: int) -> Tokens:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_tokens(self, img: Tensor) -> Tokens:
        """The branch alone, all groups, no interactions."""
        t = self.embed(img)
        for g in range(self.num_groups):
            t = self.forward_group(t, g)
        return t
