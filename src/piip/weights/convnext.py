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
from typing import Mapping, Optional

from torch import Tensor

# Hugging Face ConvNextModel <-> timm names, written once; {s} = stage, {j} = block. A template
# ending in '.' renames a prefix, any other one a whole key.
_HF_TIMM = [
    ("embeddings.patch_embeddings.", "stem.0."),
    ("embeddings.layernorm.", "stem.1."),
    ("encoder.stages.{s}.downsampling_layer.", "stages.{s}.downsample."),
    ("encoder.stages.{s}.layers.{j}.dwconv.", "stages.{s}.blocks.{j}.conv_dw."),
    ("encoder.stages.{s}.layers.{j}.layernorm.", "stages.{s}.blocks.{j}.norm."),
    ("encoder.stages.{s}.layers.{j}.pwconv1.", "stages.{s}.blocks.{j}.mlp.fc1."),
    ("encoder.stages.{s}.layers.{j}.pwconv2.", "stages.{s}.blocks.{j}.mlp.fc2."),
    ("encoder.stages.{s}.layers.{j}.layer_scale_parameter", "stages.{s}.blocks.{j}.gamma"),
]
# classifier heads and final norms a branch never applies (``norm_pre``, which timm's
# head-norm-first models do apply in forward_features, is refused as an unexpected key instead)
_UNUSED = ("head.", "layernorm.", "pooler.", "classifier.")


def _rename(key: str, hf_to_timm: bool) -> Optional[str]:
    """``key`` in one naming -> the other, or None when no template matches."""
    for hf, timm in _HF_TIMM:
        src, dst = (hf, timm) if hf_to_timm else (timm, hf)
        pattern = re.escape(src).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        m = re.match(pattern if src.endswith(".") else pattern + "$", key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end():]
    return None


def timm_to_hf(key: str) -> str:
    """A branch (timm) key -> its Hugging Face ``ConvNextModel`` name (official checkpoints)."""
    new = _rename(key, hf_to_timm=False)
    if new is None:
        raise ValueError(f"{key}: not a ConvNeXt branch key")
    return new


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
        hf = {k: _rename(k, hf_to_timm=True) for k in sd}
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
