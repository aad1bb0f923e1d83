"""CLIP vision-tower layouts -> timm ViT names (+ ``ln_pre``), then the ViT branch conversion.

Accepted layouts (detected from the keys, under any prefix such as ``vision_model.``,
``visual.`` or LLaVA's ``model.vision_tower.vision_tower.vision_model.``):
- Hugging Face ``CLIPVisionModel`` / ``CLIPModel``: ``embeddings.{patch_embedding,class_embedding,
  position_embedding}``, ``pre_layrnorm``, ``encoder.layers.i.{layer_norm1,self_attn.{q,k,v,out}_proj,
  layer_norm2,mlp.fc1,mlp.fc2}``; separate q/k/v are concatenated into the fused ``qkv``;
- OpenAI CLIP / open_clip ViT towers: ``conv1``, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks.i.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``.
The post-norm and projection (``post_layernorm``, ``ln_post``, ``proj``) are dropped: a branch
returns tokens. Position tables are resized and patch kernels resampled by
:func:`piip.weights.timm_branch.convert_timm_vit` (e.g. patch 14 -> 16, 24x24 -> the branch's grid).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

# per-block names -> timm's, written once per layout
_HF_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_OPENAI_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
                 "mlp.c_proj": "mlp.fc2"}
_DROPPED = ("post_layernorm.", "ln_post.", "proj", "embeddings.position_ids")


def _strip_prefix(sd: Mapping[str, Tensor], marker: str) -> dict[str, Tensor]:
    prefix = next(k[: -len(marker)] for k in sd if k.endswith(marker))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def clip_to_timm(sd: Mapping[str, Tensor], source: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                                list[str]]:
    """A CLIP tower state dict -> (timm ViT state dict, ``ln_pre`` tensors, notes)."""
    if any(k.endswith("embeddings.patch_embedding.weight") for k in sd):
        sd, layout = _strip_prefix(sd, "embeddings.patch_embedding.weight"), "Hugging Face CLIPVisionModel"
        stem = {"embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                "embeddings.class_embedding": "cls_token", "embeddings.position_embedding.weight": "pos_embed"}
        pre, blocks, table = "pre_layrnorm.", r"^encoder\.layers\.(\d+)\.(.+)$", _HF_BLOCK
    elif any(k.endswith("conv1.weight") for k in sd) and any(k.endswith("transformer.resblocks.0.ln_1.weight")
                                                             for k in sd):
        sd, layout = _strip_prefix(sd, "conv1.weight"), "OpenAI / open_clip CLIP"
        stem = {"conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token",
                "positional_embedding": "pos_embed"}
        pre, blocks, table = "ln_pre.", r"^transformer\.resblocks\.(\d+)\.(.+)$", _OPENAI_BLOCK
    else:
        raise ValueError(f"{source}: not a CLIP vision tower (no 'embeddings.patch_embedding.weight' nor "
                         "'conv1.weight' + 'transformer.resblocks.*')")
    out: dict[str, Tensor] = {}
    ln_pre: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    dropped = []
    for k, v in sd.items():
        if k in stem:
            name = stem[k]
            out[name] = v.reshape(1, 1, -1) if name == "cls_token" else (v[None] if name == "pos_embed" and v.ndim == 2
                                                                          else v)
        elif k.startswith(pre):
            ln_pre["ln_pre." + k[len(pre):]] = v
        elif re.match(blocks, k):
            i, rest = re.match(blocks, k).groups()
            m = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if m:
                qkv.setdefault((int(i), m.group(2)), {})[m.group(1)] = v
                continue
            m = re.match(r"^attn\.in_proj_(weight|bias)$", rest)
            if m:
                out[f"blocks.{i}.attn.qkv.{m.group(1)}"] = v
                continue
            base, leaf = rest.rsplit(".", 1)
            if base not in table:
                raise ValueError(f"{source}: unexpected CLIP block key {k!r}")
            out[f"blocks.{i}.{table[base]}.{leaf}"] = v
        elif k.startswith(_DROPPED):
            dropped.append(k)
        else:
            raise ValueError(f"{source}: unexpected key {k!r} for a {layout} tower")
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: block {i} has only {sorted(parts)} of the q/k/v {leaf}s")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    notes = [f"{layout} layout" + (" (q/k/v fused into qkv)" if qkv else "")]
    if dropped:
        notes.append(f"dropped {sorted(dropped)} (post-norm / projection: unused by a branch)")
    return out, ln_pre, notes


__all__ = ["clip_to_timm"]
