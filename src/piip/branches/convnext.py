"""ConvNeXt branch: timm's ConvNeXt modules cut into the released flat block list.

Why timm's modules: timm / open_clip ConvNeXt weights (and, renamed, Hugging Face ``ConvNextModel``
ones) then load 1:1 under the keys ``stem.{0,1}``, ``stages.s.downsample.{0,1}`` and
``stages.s.blocks.j.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``; the classifier head is not built.

The released PIIP code treats every downsampling layer as a block, so ConvNeXt-T has 21 blocks
(3 + ds + 3 + ds + 9 + ds + 3) and S/B/L 39, and ``interaction_groups`` index that flat list. The
token width and stride change inside the branch: each group reports the width and stride of its
last block. Tokens keep the (B, H*W, C) layout between groups; a group runs on the NCHW map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import BranchConfig
from .base import Branch, FlopPart, Tokens
from .vit import _check_groups


class ConvNeXtBranch(Branch):
    """Stem (4x4 patch conv + LayerNorm2d) and 4 stages; no position table, linear drop path."""

    kind = "convnext"
    label = "ConvNeXt"

    def __init__(self, cfg: BranchConfig, name: str = "branch") -> None:
        super().__init__()
        from timm.models.convnext import ConvNeXt
        self.cfg, self.name = cfg, name
        dims, depths = list(cfg.stage_dims), list(cfg.stage_depths)
        net = ConvNeXt(num_classes=0, depths=tuple(depths), dims=tuple(dims), ls_init_value=cfg.layer_scale,
                       drop_path_rate=cfg.drop_path)
        self.stem, self.stages = net.stem, net.stages
        # flat block list: (stage, block index) with -1 = the stage's downsampling layer
        self.flat: list[tuple[int, int]] = []
        for s, d in enumerate(depths):
            self.flat += ([(s, -1)] if s > 0 else []) + [(s, j) for j in range(d)]
        self.groups = _check_groups(cfg.interaction_groups, len(self.flat), name)
        self.group_dims = [dims[self.flat[last][0]] for _, last in self.groups]
        self.group_strides = [4 * 2 ** self.flat[last][0] for _, last in self.groups]

    def check_input(self, h: int, w: int) -> None:
        m = self.cfg.max_stride
        if h < m or w < m:
            raise ValueError(f"{self.name} received a {h}x{w} view; a ConvNeXt branch needs at least {m} px "
                             f"per side (one token after its last downsampling)")

    def embed(self, img: Tensor) -> Tokens:
        return _tokens(self.stem(img.contiguous(memory_format=torch.channels_last)))

    def forward_group(self, tokens: Tokens, group: int) -> Tokens:
        x, (h, w), _ = tokens
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        first, last = self.groups[group]
        for s, j in self.flat[first:last + 1]:
            stage = self.stages[s]
            x = stage.downsample(x) if j < 0 else stage.blocks[j](x)
        return _tokens(x)

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks of every stage (downsampling layers stay in the root unit)."""
        return [b for s in self.stages for b in s.blocks]

    def flop_parts(self, view: tuple[int, int], patch_attention: bool = False) -> list[FlopPart]:
        """Module by module, each on the map it reads (the grid changes inside the branch)."""
        parts = [FlopPart(self.stem, view[0] * view[1], view)]
        hw = (view[0] // 4, view[1] // 4)
        for s, j in self.flat:
            stage = self.stages[s]
            parts.append(FlopPart(stage.downsample if j < 0 else stage.blocks[j], hw[0] * hw[1], hw))
            if j < 0:
                hw = (hw[0] // 2, hw[1] // 2)
        return parts

    def forward_map(self, img: Tensor) -> Tensor:
        """The branch alone as an NCHW map (equals timm's ``forward_features``)."""
        t = self.forward_tokens(img)
        return t.x.transpose(1, 2).reshape(t.x.shape[0], -1, *t.hw)


def _tokens(x: Tensor) -> Tokens:
    """NCHW map -> contiguous (B, H*W, C) tokens. The maps are kept channels-last so that this is a
    view and the blocks' channels-last Linear layers read contiguous rows: on CPU a Linear on the
    permuted rows of an NCHW-contiguous map is tens of times slower."""
    x = x.contiguous(memory_format=torch.channels_last)
    return Tokens(x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3]))


__all__ = ["ConvNeXtBranch"]
