"""ConvNeXt checkpoint layouts -> the ``convnext`` branch (timm key names), and back to Hugging Face.

Accepted layouts (detected from the keys):
- timm ``convnext_*``: ``stem.{0,1}``, ``stages.s.downsample.{0,1}``, ``stages.s.blocks.j.*``;
- open_clip ConvNeXt towers: the same under ``visual.trunk.`` (``visual.head.*`` is the CLIP
  projection and is dropped);
- layer scales stored as ``blocks.j.weight`` instead of ``blocks.j.gamma`` (what saving through
  transformers' legacy ``gamma`` -> ``weight`` renaming produces);
- Hugging Face ``ConvNextModel`` (``embeddings.*``, ``encoder.stages.*``, optionally under
  ``convnext.`` or ``convnext_model.``), the layout the released PIIP hybrids store.
Classifier heads and the final norms (timm ``head.*``, HF ``layernorm.*``) have no place in a
branch and are dropped with a note.
"""
from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

# Hugging Face ConvNextModel <-> timm, written once as (HF pattern, timm pattern) pairs
_HF_TIMM = [
    (r"embeddings\.patch_embeddings\.", "stem.0."),
    (r"embeddings\.layernorm\.", "stem.1."),
    (r"encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
]
_UNUSED = ("head.", "norm_pre.", "layernorm.", "pooler.", "classifier.")


def _hf_to_timm(key: str) -> str | None:
    for pat, repl in _HF_TIMM:
        new, n = re.subn("^" + pat, repl, key)
        if n:
            return new
    return None


def timm_to_hf(key: str) -> str:
    """A branch (timm) key -> its Hugging Face ``ConvNextModel`` name (official checkpoints)."""
    m = re.match(r"^stem\.([01])\.(.+)$", key)
    if m:
        return f"embeddings.{'patch_embeddings' if m.group(1) == '0' else 'layernorm'}.{m.group(2)}"
    m = re.match(r"^stages\.(\d+)\.downsample\.(.+)$", key)
    if m:
        return f"encoder.stages.{m.group(1)}.downsampling_layer.{m.group(2)}"
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if m:
        s, j, rest = m.groups()
        rest = {"gamma": "layer_scale_parameter"}.get(rest, rest)
        for timm_name, hf_name in (("conv_dw.", "dwconv."), ("norm.", "layernorm."), ("mlp.fc1.", "pwconv1."),
                                   ("mlp.fc2.", "pwconv2.")):
            if rest.startswith(timm_name):
                rest = hf_name + rest[len(timm_name):]
        return f"encoder.stages.{s}.layers.{j}.{rest}"
    raise ValueError(f"{key}: not a ConvNeXt branch key")


def convert_convnext(sd: Mapping[str, Tensor], source: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """Any accepted ConvNeXt layout -> (branch state dict with timm names, notes)."""
    sd = dict(sd)
    notes: list[str] = []
    for prefix in ("visual.trunk.", "convnext_model.", "convnext."):
        if any(k.startswith(prefix) for k in sd):
            dropped = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if not k.startswith(prefix)})
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            notes.append(f"read the tower under {prefix!r}" + (f", dropped {dropped}" if dropped else ""))
            break
    if any(k.startswith("encoder.stages.") for k in sd):
        hf = {k: _hf_to_timm(k) for k in sd}
        sd = {new if new is not None else k: sd[k] for k, new in hf.items()}
        notes.append("Hugging Face ConvNextModel names mapped to timm's")
    out: dict[str, Tensor] = {}
    unused = []
    for k, v in sd.items():
        if k.startswith(_UNUSED):
            unused.append(k)
            continue
        m = re.match(r"^(stages\.\d+\.blocks\.\d+)\.weight$", k)
        if m:  # a layer scale renamed gamma -> weight
            k = m.group(1) + ".gamma"
        if not k.startswith(("stem.", "stages.")):
            raise ValueError(f"{source}: unexpected key {k!r} for a ConvNeXt branch (expected timm, open_clip "
                             "'visual.trunk.' or Hugging Face ConvNextModel names)")
        out[k] = v
    if any(k.endswith(".gamma") for k in out) and any(re.match(r"^stages\.\d+\.blocks\.\d+\.weight$", k) for k in sd):
        notes.append("layer scales stored as 'weight' renamed to 'gamma'")
    if unused:
        notes.append(f"dropped {sorted({k.split('.')[0] for k in unused})} (head / final norm: unused by a branch)")
    return out, notes


__all__ = ["convert_convnext", "timm_to_hf"]
