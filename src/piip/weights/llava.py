"""Released PIIP-LLaVA checkpoints (official LLaVA-fork layout) <-> piip.llava names (llava_spec §7.3).

Pure key mapping on tensors (no transformers). The official code numbers its branches the other
way round: official ``branch1`` (CLIP-L, coarse) is piip branch 1 and official ``branch2`` (the
fine small model) piip branch 0, so official index ``k`` is piip ``2 - k``. CLIP branches are HF
``CLIPVisionTransformer`` modules under ``branch{k}.clip_model.`` and go through the one CLIP
converter (:func:`piip.weights.clip.clip_to_timm` + :func:`convert_timm_vit`); ConvNeXt branches are
timm modules under ``branch2.convnext_model.`` with layer scales named ``weight`` (the official monkey
patch) and go through :func:`piip.weights.convnext.convert_convnext`.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..branches import ConvNeXtBranch, ViTBranch
from .clip import _HF_BLOCK, clip_to_timm
from .convnext import convert_convnext
from .timm_branch import convert_timm_vit

TOWER = "model.vision_tower.vision_tower."          # official tower prefix
PIIP_TOWER = "model.vision_tower."
PROJ_INDEX = {"1": "fc1", "3": "norm", "6": "fc2"}   # nn.Sequential slots with weights
EDGE = {"2to1": "0to1", "1to2": "1to0"}              # official direction -> piip edge
GATES = {"ca_weight": "ca_gamma", "cffn_weight": "cffn_gamma"}
IGNORED = (".rotary_emb.inv_freq", "position_ids")


def official_branch_prefix(i: int) -> str:
    return f"{TOWER}branch{2 - i}."


def llm_and_projector_from_official(key: str) -> Optional[str]:
    """piip name of one official LLM / projector key; None for tower keys and ignored buffers."""
    if key.startswith(TOWER) or key.endswith(IGNORED):
        return None
    m = re.match(r"^model\.mm_projector\.branch([12])\.(\d)\.(weight|bias)$", key)
    if m:
        k, slot, leaf = m.groups()
        if slot not in PROJ_INDEX:
            raise ValueError(f"unexpected projector key {key!r} (weights sit in slots 1, 3, 6)")
        return f"model.multi_modal_projector.projs.{2 - int(k)}.{PROJ_INDEX[slot]}.{leaf}"
    if key.startswith("model.mm_projector."):
        raise ValueError(f"unexpected projector key {key!r}: only the 'separate_2branch_v1' projector is supported")
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    raise ValueError(f"unexpected key {key!r} in an official PIIP-LLaVA checkpoint")


def interaction_from_official(key: str) -> str:
    """piip name of an official interaction key (``interactions.g.interaction_units_12.branch2to1_*``)."""
    m = re.match(r"^interactions\.(\d+)\.interaction_units_12\.branch(2to1|1to2)_(proj|injector)\.(.+)$", key)
    if not m:
        raise ValueError(f"unexpected vision-tower key {TOWER + key!r}")
    g, direction, part, rest = m.groups()
    leaf = rest.rsplit(".", 1)[-1]
    if leaf in GATES and "." not in rest:
        rest = GATES[leaf]
    return f"{PIIP_TOWER}interactions.{g}.edges.{EDGE[direction]}.{part}.{rest}"


def tower_from_official(sd: Mapping[str, Tensor], tower: nn.Module, source: str) -> dict[str, Tensor]:
    """Every official tower tensor of ``sd`` -> piip names under ``model.vision_tower.``."""
    out: dict[str, Tensor] = {}
    for i, br in enumerate(tower.branches):
        prefix = official_branch_prefix(i)
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        what = f"{source} (official branch{2 - i})"
        if not sub:
            raise ValueError(f"{source}: no '{prefix}*' tensors; the checkpoint does not hold this tower's branch "
                             f"{i} ({type(br).__name__})")
        convert = _FROM_OFFICIAL.get(br.kind)
        if convert is None:  # pragma: no cover - the towers only hold these kinds
            raise ValueError(f"{source}: branch {i} is a {type(br).__name__}")
        bsd = convert(sub, br, what)
        out.update({f"{PIIP_TOWER}branches.{i}.{k}": v for k, v in bsd.items()})
    other = [k for k in sd if k.startswith(TOWER) and not k.startswith((official_branch_prefix(0),
                                                                         official_branch_prefix(1)))]
    for k in other:
        out[interaction_from_official(k[len(TOWER):])] = sd[k]
    return out


def _branch_module(sub: Mapping[str, Tensor], prefix: str, expected: str, what: str) -> None:
    """The official branch must hold the module this branch kind loads from (else: the other variant)."""
    if not any(k.startswith(prefix) for k in sub):
        raise ValueError(f"{what}: expected a {expected} branch ('{prefix}*'), found "
                         f"{sorted({k.split('.')[0] for k in sub})}: wrong variant")


def _convnext_from_official(sub: Mapping[str, Tensor], br: ConvNeXtBranch, what: str) -> dict[str, Tensor]:
    _branch_module(sub, "convnext_model.", "ConvNeXt", what)
    return convert_convnext(sub, what)[0]


def _clip_from_official(sub: Mapping[str, Tensor], br: ViTBranch, what: str) -> dict[str, Tensor]:
    _branch_module(sub, "clip_model.", "CLIP", what)
    tsd, ln_pre, _ = clip_to_timm(sub, what)
    bsd, _, _ = convert_timm_vit(tsd, br, None, "fold", what)
    bsd.update(ln_pre)
    return bsd


# official branch (``branch{k}.*`` tensors) -> piip branch state dict, per branch kind (``Branch.kind``)
_FROM_OFFICIAL = {ConvNeXtBranch.kind: _convnext_from_official, ViTBranch.kind: _clip_from_official}


def official_interaction_count(keys: Iterable[str]) -> int:
    groups = {int(m.group(1)) for k in keys if (m := re.match(re.escape(TOWER) + r"interactions\.(\d+)\.", k))}
    return max(groups) + 1 if groups else 0


# ---------------------------------------------------------------------------- piip -> official
def to_official_llava_state_dict(sd: Mapping[str, Tensor], tower: nn.Module) -> dict[str, Tensor]:
    """A piip PIIP-LLaVA state dict -> the official layout (for interoperability and tests).

    The class-token position is not recoverable from the folded ``cls_token``: it is written as
    ``class_embedding = cls_token`` and a zero position row 0 (the official forward is the same).
    ``post_layernorm`` / ConvNeXt ``head.norm`` are written as identities (never used at run time)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.projs."):
            i, name, leaf = re.match(r"^model\.multi_modal_projector\.projs\.(\d)\.(\w+)\.(\w+)$", k).groups()
            slot = {n: s for s, n in PROJ_INDEX.items()}[name]
            out[f"model.mm_projector.branch{2 - int(i)}.{slot}.{leaf}"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif k.startswith(PIIP_TOWER + "interactions."):
            g, edge, part, rest = re.match(r"^model\.vision_tower\.interactions\.(\d+)\.edges\.(\w+)\.(proj|injector)"
                                           r"\.(.+)$", k).groups()
            direction = {e: d for d, e in EDGE.items()}[edge]
            rest = {n: o for o, n in GATES.items()}.get(rest, rest)
            out[f"{TOWER}interactions.{g}.interaction_units_12.branch{direction}_{part}.{rest}"] = v
    for i, br in enumerate(tower.branches):
        pre = f"{PIIP_TOWER}branches.{i}."
        bsd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        convert = _TO_OFFICIAL.get(br.kind)
        if convert is None:  # pragma: no cover - the towers only hold these kinds
            raise ValueError(f"branch {i} is a {type(br).__name__}: it has no official PIIP-LLaVA layout")
        out.update(convert(bsd, br, official_branch_prefix(i)))
    return out


def _convnext_to_official(bsd: dict[str, Tensor], br: ConvNeXtBranch, dst: str) -> dict[str, Tensor]:
    """timm names under ``convnext_model.``, layer scales named ``weight``, an identity ``head.norm``."""
    out = {dst + "convnext_model." + re.sub(r"\.gamma$", ".weight", k): v for k, v in bsd.items()}
    c = br.stages[-1].blocks[-1].norm.weight.shape[0]
    out[dst + "convnext_model.head.norm.weight"] = torch.ones(c)
    out[dst + "convnext_model.head.norm.bias"] = torch.zeros(c)
    return out


def _clip_to_official(bsd: dict[str, Tensor], br: ViTBranch, dst: str) -> dict[str, Tensor]:
    """Hugging Face ``CLIPVisionTransformer`` names under ``clip_model.`` (see the caller's doc)."""
    out: dict[str, Tensor] = {}
    hf_block = {v: k for k, v in _HF_BLOCK.items()}
    cm = dst + "clip_model."
    cls = bsd.pop("cls_token").reshape(-1)
    pos = bsd.pop("pos_embed")[0]
    out[cm + "embeddings.class_embedding"] = cls
    out[cm + "embeddings.position_embedding.weight"] = torch.cat([torch.zeros_like(pos[:1]), pos])
    out[cm + "embeddings.patch_embedding.weight"] = bsd.pop("patch_embed.proj.weight")
    for leaf in ("weight", "bias"):
        out[cm + f"pre_layrnorm.{leaf}"] = bsd.pop(f"ln_pre.{leaf}")
    c = cls.shape[0]
    out[cm + "post_layernorm.weight"], out[cm + "post_layernorm.bias"] = torch.ones(c), torch.zeros(c)
    for k, v in bsd.items():
        j, base, leaf = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", k).groups()
        lp = f"{cm}encoder.layers.{j}."
        if base == "attn.qkv":
            for name, part in zip("qkv", v.chunk(3, 0)):
                out[lp + f"self_attn.{name}_proj.{leaf}"] = part.clone()
        else:
            out[lp + f"{hf_block[base]}.{leaf}"] = v
    return out


# piip branch state dict -> official ``branch{k}.*`` tensors, per branch kind (``Branch.kind``)
_TO_OFFICIAL = {ConvNeXtBranch.kind: _convnext_to_official, ViTBranch.kind: _clip_to_official}


__all__ = ["TOWER", "llm_and_projector_from_official", "interaction_from_official", "tower_from_official",
           "official_interaction_count", "to_official_llava_state_dict"]
