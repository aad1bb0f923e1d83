"""The interface every branch kind (ViT with its flavours, ConvNeXt) implements.

A branch turns its view of the image into tokens, then runs one *group* of its blocks at a
time so that the backbone can interleave interactions. Token width and stride may change
from group to group (hierarchical CNN branches), hence ``group_dims``/``group_strides``.

Everything else that differs between kinds is asked of the branch too, so that the layers above
(optimizer, FSDP, FLOP counting, checkpoint converters) hold no ``kind == ...`` checks:
``layer_id`` / ``decay_depth`` (layer-wise lr decay), ``fsdp_units``, ``flop_parts`` /
``params_at`` (FLOP and parameter counts), ``supports_grad_checkpointing`` and ``kind`` (the key
the weights converters and ``piip.config``'s per-kind rules are registered under).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn


class FlopPart(NamedTuple):
    """One module a branch runs, for FLOP counting: it reads ``tokens`` rows on an ``hw`` map;
    ``reads`` maps ``id(submodule)`` to the (tokens, hw) that submodule reads instead."""

    module: nn.Module
    tokens: int
    hw: tuple[int, int]
    reads: Optional[dict[int, tuple[int, tuple[int, int]]]] = None


class Tokens(NamedTuple):
    """A branch's state: patch tokens (B, H*W, C) on an (H, W) grid, plus an optional class token."""

    x: Tensor
    hw: tuple[int, int]
    cls: Optional[Tensor] = None


class Branch(nn.Module):
    """Abstract branch. Subclasses set ``kind``, ``group_dims``, ``group_strides`` and ``name``."""

    kind: str = ""
    label: str = ""                              # how reports name the kind (e.g. "ViT")
    name: str = "branch"
    supports_grad_checkpointing: bool = False   # whether ``cfg.with_cp`` recomputes its blocks in backward
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

    # ------------------------------------------------------------------ what layers above ask
    @property
    def decay_depth(self) -> int:
        """Blocks that layer-wise lr decay spreads over (0: the branch is not decayed)."""
        return 0

    def layer_id(self, name: str, stride: float, top: int) -> Optional[int]:
        """Layer id of parameter ``name`` (relative to the branch) for layer-wise lr decay, given the
        branch's block ``stride`` in the deepest branch's layers and the ``top`` id; None = ``top``."""
        return None

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as their own units (one per block)."""
        return list(getattr(self, "blocks", None) or [])

    def flop_parts(self, view: tuple[int, int], patch_attention: bool = False) -> list[FlopPart]:
        """Every module the branch runs on a ``view``-sized image and what it reads (FLOP counting).
        ``patch_attention``: self-attention products on the patch tokens only (the PIIP-LLaVA counter)."""
        raise ValueError(f"FLOP counting does not support {type(self).__name__} ({self.name})")

    def params_at(self, view: tuple[int, int]) -> int:
        """Parameters as the papers count them for a ``view``-sized input (position tables at its grid)."""
        return sum(p.numel() for p in self.parameters())
