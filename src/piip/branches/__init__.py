"""Branches: pretrained networks cut into groups of blocks."""
from ..config import BranchConfig
from .base import Branch, FlopPart, Tokens
from .convnext import ConvNeXtBranch
from .vit import Block, ViTBranch

# the branch kinds: ``BranchConfig.kind`` -> class (its per-kind config rules: ``piip.config.BRANCH_KIND_RULES``)
_BRANCH_KINDS = {cls.kind: cls for cls in (ViTBranch, ConvNeXtBranch)}


def build_branch(cfg: BranchConfig, name: str = "branch") -> Branch:
    if cfg.kind not in _BRANCH_KINDS:
        raise ValueError(f"{name}: unknown branch kind {cfg.kind!r}; available: {sorted(_BRANCH_KINDS)}")
    return _BRANCH_KINDS[cfg.kind](cfg, name=name)


__all__ = ["Branch", "FlopPart", "Tokens", "Block", "ViTBranch", "ConvNeXtBranch", "build_branch"]
