"""A ViT branch (and its classifier head) -> timm's ``VisionTransformer`` state dict.

The inverse of ``timm_branch.convert_timm_vit`` for plain ViT branches: a single-branch classifier
trained with ``piip train classification`` becomes a file any timm user (and
``pretrained_branches``) can read, so a model pretrained here is loaded like DeiT weights are.
Exact (the class slot of the released layout, unused by the branch, is not written): timm adds ``pos_embed[:, :1]`` to the class token, so the class slot is written as zeros
and the (folded) class token as is.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..branches.base import Branch
from ..branches.vit import ViTBranch


def branch_to_timm(branch: Branch, head: Optional[nn.Module] = None) -> dict[str, Tensor]:
    """timm keys for ``branch`` (+ ``head``: a ``ClsHead`` with ``norm`` and ``fc``)."""
    export = _TO_TIMM.get(branch.kind)
    if export is None:
        raise ValueError(f"only ViT branches export to timm's VisionTransformer, got {type(branch).__name__}")
    return export(branch, head)


def _vit_to_timm(branch: ViTBranch, head: Optional[nn.Module]) -> dict[str, Tensor]:
    cfg = branch.cfg
    if cfg.pos_layout not in ("learned", "learned_cls") or cfg.rel_pos_bias or cfg.pre_norm or cfg.mlp_act != "gelu":
        raise ValueError(f"the {cfg.flavour} branch (pos_layout={cfg.pos_layout}, rel_pos_bias={cfg.rel_pos_bias}, "
                         f"pre_norm={cfg.pre_norm}, mlp_act={cfg.mlp_act}) has no plain timm VisionTransformer layout")
    if any(cfg.window_sizes):
        raise ValueError("a branch with window attention has no timm VisionTransformer layout (global attention only)")
    sd = {k: v.detach().cpu().clone() for k, v in branch.state_dict().items()}
    out: dict[str, Tensor] = {}
    pos = sd.pop("pos_embed")[:, branch.pos_slot:]  # the released layout's class slot is unused by the branch
    cls = sd.pop("cls_token", None)
    if cls is not None:  # the class token already holds its position: timm's slot becomes zeros
        out["cls_token"] = cls
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    out["pos_embed"] = pos
    if "patch_embed.proj.bias" not in sd:
        sd["patch_embed.proj.bias"] = torch.zeros(cfg.embed_dim)
    for k, v in sd.items():
        if k.endswith(".relative_position_index"):
            continue
        out[k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = v
    if head is not None:
        out["norm.weight"], out["norm.bias"] = head.norm.weight.detach().cpu(), head.norm.bias.detach().cpu()
        if isinstance(head.fc, nn.Linear):
            out["head.weight"], out["head.bias"] = head.fc.weight.detach().cpu(), head.fc.bias.detach().cpu()
    return out


# the timm layout each branch kind (``Branch.kind``) exports to
_TO_TIMM = {ViTBranch.kind: _vit_to_timm}


def classifier_to_timm(model: nn.Module) -> dict[str, Tensor]:
    """A single-branch ``PIIPClassifier`` (``head='cls_token'``) -> timm state dict."""
    branches = model.backbone.branches
    if len(branches) != 1 or getattr(model.cfg, "head", None) != "cls_token":
        raise ValueError(f"timm export needs a single-branch classifier with a class-token head; this model has "
                         f"{len(branches)} branches and head={getattr(model.cfg, 'head', None)!r}")
    return branch_to_timm(branches[0], model.heads[0])


def timm_model_kwargs(branch: ViTBranch, num_classes: int = 0) -> dict:
    """The ``timm.models.vision_transformer.VisionTransformer`` arguments that take the exported keys."""
    cfg = branch.cfg
    return {"img_size": branch.pos_grid[0] * cfg.patch_size, "patch_size": cfg.patch_size,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
            "qkv_bias": cfg.qkv_bias, "class_token": cfg.cls_token, "global_pool": "token" if cfg.cls_token else "avg",
            "init_values": cfg.layer_scale, "num_classes": num_classes}
