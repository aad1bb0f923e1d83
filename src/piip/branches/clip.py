"""CLIP vision tower as a ViT branch (OpenAI CLIP / open_clip ViT / Hugging Face ``CLIPVisionModel``).

Why a subclass of the ViT branch: CLIP differs from DeiT-style ViTs only in a few settings, and
everything else (blocks, groups, windowing, position-table resizing) is shared. CLIP semantics:
patch convolution without bias; the class embedding carries its own position (folded into
``cls_token`` at load time); ``ln_pre`` normalises every token after the position add;
quick-GELU MLPs (OpenAI CLIP, the towers PIIP-LLaVA uses); LayerNorm eps 1e-5; no layer scale.
Checkpoint layouts are converted in :mod:`piip.weights.clip`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import BranchConfig
from .base import Tokens
from .vit import ViTBranch


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPBranch(ViTBranch):
    """ViT branch with CLIP's embedding, pre-norm, activation and LayerNorm epsilon (keys: the ViT
    branch's plus ``ln_pre``)."""

    def __init__(self, cfg: BranchConfig, name: str = "branch") -> None:
        super().__init__(cfg, name)
        self.patch_embed.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        for m in self.blocks.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-5
        for blk in self.blocks:
            blk.mlp.act = QuickGELU()

    def embed(self, img: Tensor) -> Tokens:
        t = super().embed(img)
        return Tokens(self.ln_pre(t.x), t.hw, self.ln_pre(t.cls) if t.cls is not None else None)
