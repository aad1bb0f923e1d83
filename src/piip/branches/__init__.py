"""Branches: pretrained networks cut into groups of blocks."""
from ..config import BranchConfig
from .base import Branch, Tokens
from .convnext import ConvNeXtBranch
from .vit import Block, ViTBranch

_BRANCH_KINDS = {"vit": ViTBranch, "convnext": ConvNeXtBranch}


def build_branch(cfg: BranchConfig, name: str = "branch") -> Branch:
    if cfg.kind not in _BRANCH_KINDS:
        raise ValueError(f"{name}: unknown branch kind {cfg.kind!r}; available: {sorted(_BRANCH_KINDS)}")
    return _BRANCH_KINDS[cfg.kind](cfg, name=name)


__all__ = ["Branch", "Tokens", "Block", "ViTBranch", "ConvNeXtBranch", "build_branch"]
