"""Image classification on a PIIP backbone.

``head='cls_token'``: every branch has a class token, its own norm + linear head, and the
branch logits are averaged (the released classification models). ``head='merged'``: the
merged map's tokens are normed, averaged and classified (from-scratch PIIP-B of Table X).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch.nn.init import trunc_normal_
from torch import Tensor, nn

from ..backbone import PIIPBackbone, _to_map, group_matcher, take_intermediates
from ..branches import Tokens
from ..config import PIIPConfig
from ..integrations.timm_cfg import PretrainedCfgMixin


class ClsHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class PIIPClassifier(PretrainedCfgMixin, nn.Module):
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

    # ------------------------------------------------------------------ timm model interface
    @property
    def feature_info(self) -> list[dict]:
        """Each branch's final map (see :attr:`PIIPBackbone.feature_info`)."""
        return self.backbone.feature_info

    @property
    def num_features(self) -> int:
        """Width of what the classifier reads (``forward_head(..., pre_logits=True)``)."""
        return sum(h.norm.normalized_shape[0] for h in self.heads)

    head_hidden_size = num_features

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's signature: per-branch final maps; the final features go to :meth:`forward_head`."""
        states = self.backbone.forward_branches(x)
        final = states if self.cfg.head == "cls_token" else self.backbone.merge_tokens(states)
        return take_intermediates([_to_map(t) for t in states], final, indices, norm, output_fmt, intermediates_only)

    def group_matcher(self, coarse: bool = False):
        return group_matcher(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {"backbone." + n for n in self.backbone.no_weight_decay()}

    def get_classifier(self) -> nn.Module:
        """The linear layer(s): one per branch for the class-token head (their logits are averaged)."""
        return self.heads[0].fc if len(self.heads) == 1 else nn.ModuleList(h.fc for h in self.heads)

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        """New, freshly initialised linear layer(s) for ``num_classes`` (0: none, features out)."""
        if global_pool not in (None, "", "token", "avg"):
            raise ValueError(f"global_pool={global_pool!r}: a PIIP classifier pools as its head ({self.cfg.head}) says")
        for h in self.heads:
            dim = h.norm.normalized_shape[0]
            h.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                trunc_normal_(h.fc.weight, std=0.02)
                nn.init.zeros_(h.fc.bias)
        self.num_classes = num_classes
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        if "_pretrained_cfg" in self.__dict__:
            self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}


if TYPE_CHECKING:
    from ..export.tasks import ExportTask


def export_task() -> "ExportTask":
    """Classifiers' entry in ``piip export``'s task table: a (B, 3, H, W) batch in, ``logits`` out."""
    from ..export.tasks import image_task
    return image_task("classification", PIIPClassifier, lambda m: ["logits"], lambda m: m.backbone)
