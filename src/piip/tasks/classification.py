"""Image classification on a PIIP backbone.

``head='cls_token'``: every branch has a class token, its own norm + linear head, and the
branch logits are averaged (the released classification models). ``head='merged'``: the
merged map's tokens are normed, averaged and classified (from-scratch PIIP-B of Table X).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn.init import trunc_normal_
from torch import Tensor, nn

from ..backbone import PIIPBackbone
from ..branches import Tokens
from ..config import PIIPConfig


class ClsHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class PIIPClassifier(nn.Module):
    def __init__(self, cfg: PIIPConfig) -> None:
        super().__init__()
        if cfg.head_token not in ("cls", "first_patch"):
            raise ValueError(f"head_token must be 'cls' or 'first_patch', got {cfg.head_token!r}")
        if cfg.head not in ("cls_token", "merged"):
            raise ValueError(f"classification head must be 'cls_token' or 'merged', got {cfg.head!r}")
        if cfg.head == "cls_token":
            missing = [i for i, b in enumerate(cfg.branches) if not b.cls_token]
            if missing:
                raise ValueError(f"head='cls_token' needs a class token in every branch; branches {missing} have none")
            cfg = dataclasses.replace(cfg, merge=None)
        elif cfg.merge is None:
            cfg = dataclasses.replace(cfg, merge="linear")
        cfg = dataclasses.replace(cfg, pyramid=None, task="classification")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.backbone = PIIPBackbone(cfg)
        if cfg.head == "cls_token":
            self.heads = nn.ModuleList(ClsHead(br.out_dim, cfg.num_classes) for br in self.backbone.branches)
        else:
            self.heads = nn.ModuleList([ClsHead(self.backbone.embed_dim, cfg.num_classes)])
        for m in self.heads.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tokens] | Tensor:
        """Per-branch final tokens (cls_token head) or the merged map (merged head)."""
        states = self.backbone.forward_branches(x)
        return states if self.cfg.head == "cls_token" else self.backbone.merge_tokens(states)

    def forward_head(self, feats: list[Tokens] | Tensor, pre_logits: bool = False) -> Tensor:
        if self.cfg.head == "cls_token":
            toks = [(t.cls if self.cfg.head_token == "cls" else t.x)[:, 0] for t in feats]
            if pre_logits:
                return torch.cat([h.norm(x) for h, x in zip(self.heads, toks)], dim=-1)
            return torch.stack([h(x) for h, x in zip(self.heads, toks)], 0).mean(0)
        # as the released classification code: LayerNorm every merged token, then average
        pooled = self.heads[0].norm(feats.flatten(2).transpose(1, 2)).mean(1)
        return pooled if pre_logits else self.heads[0].fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
