"""Official PIIP checkpoints (OpenGVLab/PIIP) <-> piip modules.

Official models number branches the other way round: official ``branch1`` is the largest model
(coarsest input), our ``branches.0`` the finest. With N branches, official ``branch{k}`` is our
``branches.{N-k}``. Interaction unit ``interaction_units_{a}{b}`` (official a < b, adjacent) holds
``branch2to1_*`` (official b -> a) and ``branch1to2_*`` (a -> b); ours are ``edges.{src}to{dst}``.
The mapping is written once, ours -> official, and inverted over the model's own keys, so every
model key has exactly one official name and anything else in a checkpoint is reported.
"""
from __future__ import annotations

import re
import warnings
from typing import Mapping, Optional, Sequence

from torch import Tensor, nn

from ..branches.convnext import ConvNeXtBranch
from ..branches.vit import ViTBranch
from ..config import BranchConfig
from .convnext import timm_to_hf
from .io import PIIP_DETECTOR_BACKBONE, check_state_dict, piip_backbone_part, read_state_dict, strict_load
from .official_match import describe_official_checkpoint
from .vit_layouts import from_official_tensor, official_tensor, to_official_branch_key

# tensors official checkpoints hold but never use: the final LayerNorm of HF ConvNextModel
_UNUSED_OFFICIAL = re.compile(r"(^|\.)convnext_model\.layernorm\.(weight|bias)$")
_EDGE = re.compile(r"^interactions\.(\d+)\.edges\.(\d+)to(\d+)\.(proj|injector)\.(.+)$")


def _vit_key(rest: str, branch: Optional[BranchConfig]) -> str:
    """A ViT branch's tensor in its flavour's official layout (as named without a config)."""
    return rest if branch is None else to_official_branch_key(rest, branch)


def _convnext_key(rest: str, branch: Optional[BranchConfig]) -> str:
    """ConvNeXt branches are Hugging Face ``ConvNextModel`` s under ``convnext_model.``."""
    return "convnext_model." + timm_to_hf(rest)


# Branch.kind -> (branch-relative key, its BranchConfig or None) -> the official branch-relative key
_BRANCH_KEY = {ViTBranch.kind: _vit_key, ConvNeXtBranch.kind: _convnext_key}


def official_name(key: str, num_branches: int, kinds: Optional[Sequence[str]] = None,
                  branch: Optional[BranchConfig] = None) -> str:
    """Our backbone key -> the official backbone key (no 'backbone.' prefix). ``kinds``: each
    branch's kind (each kind's official layout is in ``_BRANCH_KEY``); ``branch``: the config of
    the branch ``key`` belongs to, for a ViT flavour's own layout."""
    n = num_branches
    parts = key.split(".")
    if parts[0] == "branches":
        rest = ".".join(parts[2:])
        if kinds is not None or branch is not None:
            kind = branch.kind if branch is not None else kinds[int(parts[1])]
            rest = _BRANCH_KEY.get(kind, _vit_key)(rest, branch)
        return rest if n == 1 else f"branch{n - int(parts[1])}.{rest}"
    if parts[0] == "inter_merges":  # regular-FPN merges after intermediate groups
        g, i = parts[1], int(parts[3])
        if parts[2] == "weights":
            return f"intermediate_merging_{g}_w{n - i}"
        return f"intermediate_merging_{g}_branch{n - i}." + ".".join(parts[4:])
    if parts[0] == "merge":
        i = int(parts[2])
        if parts[1] == "weights":
            return f"w{n - i}"
        return f"merge_branch{n - i}." + ".".join(parts[3:])
    if parts[0] == "pyramid":
        level = parts[1]  # fpn1 / fpn2 (fpn3 identity, fpn4 max-pool have no weights)
        return (f"up{level[3:]}" if n == 1 else level) + "." + ".".join(parts[2:])
    m = _EDGE.match(key)
    if m:
        group, s, d, kind, rest = m.groups()
        src, dst = n - int(s), n - int(d)
        a, b = min(src, dst), max(src, dst)
        if b - a != 1:
            raise ValueError(f"{key}: the official code only has interactions between adjacent branches")
        direction = "branch2to1" if src == b else "branch1to2"
        return f"interactions.{group}.interaction_units_{a}{b}.{direction}_{kind}.{rest}"
    raise ValueError(f"{key}: no official equivalent")


def _backbone_names(backbone: nn.Module) -> dict[str, str]:
    """{official key: our backbone key}; branch-internal names follow each ViT branch's flavour
    layout (ConvNeXt branches: Hugging Face ``ConvNextModel`` names, see :func:`official_name`)."""
    n = len(backbone.branches)
    table = {}
    for k in backbone.state_dict():
        branch = backbone.cfg.branches[int(k.split(".", 2)[1])] if k.startswith("branches.") else None
        table[official_name(k, n, branch=branch)] = k
    return table


def _official_names(model: nn.Module) -> tuple[dict[str, str], str]:
    """{official key: our key} for every tensor of ``model``, and the checkpoint's task kind."""
    from ..backbone import PIIPBackbone
    from ..tasks.classification import PIIPClassifier
    if isinstance(model, PIIPClassifier):
        n = len(model.backbone.branches)
        table = {off: f"backbone.{k}" for off, k in _backbone_names(model.backbone).items()}
        for k in model.heads.state_dict():
            i, sub, rest = k.split(".", 2)
            if model.cfg.head == "merged":  # released classification code: cls_norm + cls_head
                table[f"cls_{'norm' if sub == 'norm' else 'head'}.{rest}"] = f"heads.{k}"
            else:  # a single-branch classifier is a plain DeiT / timm ViT: norm.*, head.*
                prefix = f"branch{n - int(i)}." if n > 1 else ""
                table[f"{prefix}{'norm' if sub == 'norm' else 'head'}.{rest}"] = f"heads.{k}"
        return table, "classification"
    if isinstance(model, PIIPBackbone):
        return _backbone_names(model), "detection"
    raise ValueError(f"official checkpoints load into a PIIPBackbone or PIIPClassifier, not {type(model).__name__}")


def _branch_of(model: nn.Module, key: str):
    """(branch config, branch-internal key) for one of our keys, or None."""
    backbone = getattr(model, "backbone", model)
    k = key[len("backbone."):] if key.startswith("backbone.") and hasattr(model, "backbone") else key
    if not k.startswith("branches."):
        return None
    _, i, rest = k.split(".", 2)
    return backbone.cfg.branches[int(i)], rest


def convert_official_state_dict(sd: Mapping[str, Tensor], model: nn.Module,
                                source: str = "official checkpoint") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Official state dict (the checkpoint's ``state_dict`` or ``model``) -> (our state dict for ``model``,
    the detector's neck/head tensors that a backbone cannot hold). Raises on any key or shape mismatch.

    Works on meta tensors (key/shape checks without memory).
    """
    table, kind = _official_names(model)
    sd = dict(sd)
    extra: dict[str, Tensor] = {}
    if kind == "detection":
        if not any(k.startswith("backbone.") for k in sd) and any(k in table for k in sd):
            pass  # a bare backbone state dict
        else:
            extra = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    ours, unexpected = {}, []
    for k, v in sd.items():
        if k in table:
            where = _branch_of(model, table[k])
            ours[table[k]] = from_official_tensor(where[1], v, where[0]) if where else v
        elif not _UNUSED_OFFICIAL.search(k):
            unexpected.append(k)
    missing = sorted(k for k, v in table.items() if k not in sd)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing official key(s): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected)[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        raise ValueError(f"{source} does not match this {kind} model ({type(model).__name__}, "
                         f"{len(table)} tensors): " + "; ".join(parts)
                         + ". " + describe_official_checkpoint(sd))
    try:
        check_state_dict(model, ours, source)
    except ValueError as e:
        raise ValueError(f"{e}. {describe_official_checkpoint(sd)}") from None
    return ours, extra


def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's weights under official names (detection: with 'backbone.' prefix, as in mmdet files)."""
    table, kind = _official_names(model)
    own = model.state_dict()
    prefix = "backbone." if kind == "detection" else ""
    out = {}
    for off, ours in table.items():
        where = _branch_of(model, ours)
        out[prefix + off] = official_tensor(where[1], own[ours], where[0]) if where else own[ours]
    return out


def _find_piip(model: nn.Module) -> tuple[str, nn.Module]:
    from ..backbone import PIIPBackbone
    from ..tasks.classification import PIIPClassifier
    if isinstance(model, (PIIPBackbone, PIIPClassifier)):
        return "", model
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (PIIPBackbone, PIIPClassifier))]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} contains {len(found)} PIIP backbones; expected exactly one")
    return found[0][0] + ".", found[0][1]


def load_checkpoint(model: nn.Module, path: str, weights_only: bool = True,
                    state_dict: Optional[Mapping[str, Tensor]] = None,
                    assign: bool = False) -> Optional[dict[str, Tensor]]:
    """Load an official PIIP checkpoint (mmdet detection or classification) or a piip safetensors file.

    ``model`` is a PIIPBackbone, a PIIPClassifier, or a detector containing one PIIPBackbone. For a
    detector with torchvision ``rpn``/``roi_heads``, the mmdet neck and heads are converted too
    (see :func:`convert_mmdet_heads`); for a bare backbone they are skipped with a warning and returned.
    ``state_dict``: the file's tensors when the caller has read them already. ``assign``: ``model`` is on
    the meta device and receives the tensors one by one (``piip.weights.lazy.materialize``).
    """
    load = _materialize if assign else strict_load
    sd = dict(state_dict) if state_dict is not None else read_state_dict(path, weights_only=weights_only)
    own = model.state_dict()
    body = piip_backbone_part(sd)
    if body is not None and not any(k.startswith(PIIP_DETECTOR_BACKBONE) for k in own):
        sd = body  # a piip detector (training checkpoint) loaded into its bare backbone
    if sum(k in own for k in sd) > len(sd) / 2:  # our own naming (save_pretrained / piip convert / training)
        try:
            load(model, sd, path)
        except ValueError as e:
            if body is None:
                raise
            raise ValueError(f"{e}. {path} is a piip detector checkpoint: build the backbone with the overrides it "
                             "was trained with, or load the whole detector with "
                             "piip.tasks.detection.load_detector(path)") from None
        return None
    prefix, piip_model = _find_piip(model)
    ours, extra = convert_official_state_dict(sd, piip_model, path)
    full = {prefix + k: v for k, v in ours.items()}
    if prefix and hasattr(model, "rpn") and hasattr(model, "roi_heads"):
        from .mmdet_heads import convert_mmdet_heads
        full.update(convert_mmdet_heads(extra))
        load(model, full, path)
        return None
    if prefix:
        raise ValueError(f"{type(model).__name__} holds other modules besides its PIIP backbone; only torchvision "
                         "detectors (with rpn and roi_heads) are supported; load into the backbone instead")
    del sd, ours
    load(model, full, path)
    if extra:
        warnings.warn(f"{path}: {len(extra)} neck/head tensors ({sorted({k.split('.')[0] for k in extra})}) were "
                      "not loaded: the model is a backbone; convert them with piip.weights.convert_mmdet_heads")
    return extra or None


def _materialize(model: nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    from .lazy import materialize
    materialize(model, dict(sd), source)
