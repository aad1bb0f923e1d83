"""Initialise PIIP branches from the ViT flavours' checkpoints: timm (``deit3_*``, ``vit_*_augreg*``,
``vit_*_dinov2``, ``vit_*_mae``, ``beitv2_*``) and the original files the released configs name
(``dinov2_vit*14_pretrain.pth``, ``mae_pretrain_vit_*.pth``, ``beitv2_*_pt1k_ft21k.pth``, Uni-Perceiver
``*_converted.pth``); foreign key layouts are mapped first (``vit_layouts.normalise_vit_state_dict``).
CLIP-flavour branches read OpenAI / open_clip / Hugging Face CLIP layouts (converted to timm names by
``weights.clip.clip_to_timm``) and ConvNeXt branches the layouts of ``weights.convnext``.

timm -> branch differences handled here:
- ``pos_embed``: the class-token slot (if any) is split off and the patch part is bicubic-resized
  from the checkpoint's grid to the branch's stored ``pos_grid``.
- class token: timm adds ``pos_embed[:, :1]`` to it; our branch has no class position slot, so that
  vector is folded into ``cls_token`` (``cls_pos='fold'``, exact) or dropped (``'drop'``, what the
  released PIIP code did). Branches without a class token drop both.
- patch kernels of another size are resampled with timm's ``resample_patch_embed`` (FlexiViT
  pseudo-inverse: a resized patch through the new kernel gives the old kernel's token), except for
  the InternViT-class flavours (``augreg``, ``dinov2``, ``mae``: DINOv2 and MAE-H are patch 14),
  which get the released code's plain bicubic resize (14 -> 16).
- ``learned_cls`` branches keep the checkpoint's class position in their (unused) slot 0; ``none``
  branches (BEiT) drop any absolute table; BEiT relative position tables are resized per window.
- layer scale: ``blocks.i.ls1.gamma`` / ``ls2.gamma`` (timm) or ``gamma_1`` / ``gamma_2`` (original
  DeiT III release) -> ``gamma_1`` / ``gamma_2``. A checkpoint without layer scale loaded into a
  branch with layer scale sets the gammas to 1 (identity); a checkpoint with layer scale loaded into
  a branch without it has the gammas folded into ``attn.proj`` / ``mlp.fc2`` (exact).
- ``norm`` (or ``fc_norm``) and ``head`` map to a classifier's ``heads.{i}.norm`` / ``heads.{i}.fc``;
  dense models and ``heads=False`` drop them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..branches.convnext import ConvNeXtBranch
from ..branches.vit import ViTBranch, resize_pos_embed
from ..layers.attention import relative_position_index
from .clip import clip_to_timm
from .convnext import convert_convnext
from .io import read_state_dict, strict_load, unwrap_state_dict
from .vit_layouts import _INTERNVIT_FLAVOURS, guess_flavour, normalise_vit_state_dict, resize_patch_kernel_bicubic, resize_rel_pos_table

Entry = Union[None, str, os.PathLike, dict, nn.Module]


@dataclass
class BranchLoadReport:
    """What happened to one branch: where the weights came from and every adaptation applied."""

    branch: int
    source: Optional[str]
    notes: list[str] = field(default_factory=list)


def _backbone_and_heads(model: nn.Module) -> tuple[nn.Module, Optional[nn.ModuleList]]:
    from ..backbone import PIIPBackbone
    from ..tasks.classification import PIIPClassifier
    if isinstance(model, PIIPClassifier):
        heads = model.heads if model.cfg.head == "cls_token" else None
        return model.backbone, heads
    if isinstance(model, PIIPBackbone):
        return model, None
    found = [m for m in model.modules() if isinstance(m, PIIPBackbone)]
    if len(found) != 1:
        raise ValueError(f"model must be a PIIPBackbone, a PIIPClassifier or contain exactly one PIIPBackbone; "
                         f"{type(model).__name__} contains {len(found)}")
    return found[0], None


def _entry_state_dict(entry: Entry, index: int) -> tuple[dict[str, Tensor], str]:
    if isinstance(entry, nn.Module):
        return dict(entry.state_dict()), f"{type(entry).__name__} instance"
    if isinstance(entry, dict):
        return unwrap_state_dict(entry, f"pretrained_branches[{index}]"), "state dict"
    if isinstance(entry, (str, os.PathLike)):
        path = os.fspath(entry)
        if os.path.isfile(path):
            return read_state_dict(path), path
        import timm
        if timm.is_model(path.split(".")[0]) or timm.is_model(path):
            # may download from the Hugging Face hub: user code only, never tests
            from .hub import from_hub
            model = from_hub(lambda: timm.create_model(path, pretrained=True), f"pretrained_branches[{index}] = {path!r}",
                             "download it on a connected machine first, or give a weights file path")
            return dict(model.state_dict()), f"timm:{path}"
        raise ValueError(f"pretrained_branches[{index}] = {path!r} is neither an existing file nor a timm model name")
    raise ValueError(f"pretrained_branches[{index}] must be a path, a timm model name, a state dict, a timm model "
                     f"or None; got {type(entry).__name__}")


def _split_pos_embed(pos: Tensor, has_cls: bool, source: str) -> tuple[Optional[Tensor], Tensor, int]:
    """(cls position or None, patch positions (1, g*g, C), g)."""
    length = pos.shape[1]
    g = math.isqrt(length)
    prefix = length - g * g
    if prefix == 0:
        return None, pos, g
    if prefix == 1 and has_cls:
        return pos[:, :1], pos[:, 1:], g
    raise ValueError(f"{source}: pos_embed has {length} positions: not a square grid plus at most one class-token "
                     f"slot (distilled DeiT / register tokens are not supported)")


def convert_timm_vit(sd: dict[str, Tensor], branch: ViTBranch, head: Optional[nn.Module] = None,
                     cls_pos: str = "fold", source: str = "checkpoint") -> tuple[dict, dict, list[str]]:
    """timm ViT state dict -> (branch state dict, head state dict, notes). Pure function of its inputs."""
    if cls_pos not in ("fold", "drop"):
        raise ValueError(f"cls_pos must be 'fold' or 'drop', got {cls_pos!r}")
    sd, notes = normalise_vit_state_dict(sd)
    for k in ("dist_token", "reg_token", "register_tokens"):
        if k in sd:
            raise ValueError(f"{source}: has {k!r}; distillation/register tokens have no place in a PIIP branch")
    out = _patch_embed(sd, branch, notes, source)
    out.update(_embedding(sd, branch, cls_pos, notes, source))
    out.update(_blocks(sd, branch, notes))
    head_sd = _final_norm_and_head(sd, head, notes, source)
    return out, head_sd, notes


def _patch_embed(sd: dict[str, Tensor], branch: ViTBranch, notes: list[str], source: str) -> dict[str, Tensor]:
    """The patch kernel (resized to the branch's patch size) and bias; pops them from ``sd``."""
    w = sd.pop("patch_embed.proj.weight", None)
    if w is None:
        raise ValueError(f"{source}: no 'patch_embed.proj.weight'; is this a timm ViT checkpoint?")
    p = branch.patch_size
    if tuple(w.shape[-2:]) != (p, p) and branch.cfg.flavour in _INTERNVIT_FLAVOURS:
        notes.append(f"patch kernel resized {tuple(w.shape[-2:])} -> ({p}, {p}) (bicubic, as the released code)")
        w = resize_patch_kernel_bicubic(w, p)
    elif tuple(w.shape[-2:]) != (p, p):
        from timm.layers import resample_patch_embed
        notes.append(f"patch kernel resampled {tuple(w.shape[-2:])} -> ({p}, {p}) (FlexiViT pseudo-inverse)")
        w = resample_patch_embed(w.float(), [p, p]).to(w.dtype)
    out = {"patch_embed.proj.weight": w}
    if "patch_embed.proj.bias" in sd:
        out["patch_embed.proj.bias"] = sd.pop("patch_embed.proj.bias")
    return out


def _embedding(sd: dict[str, Tensor], branch: ViTBranch, cls_pos: str, notes: list[str],
               source: str) -> dict[str, Tensor]:
    """Position table, Uni-Perceiver's embedding and the class token; pops them from ``sd``."""
    out: dict[str, Tensor] = {}
    cls_token = sd.pop("cls_token", None)
    cls_p = None
    if branch.pos_embed is None:
        if sd.pop("pos_embed", None) is not None:
            notes.append("absolute position table dropped (the branch has none)")
    elif "pos_embed" not in sd:
        raise ValueError(f"{source}: no 'pos_embed' but the {branch.cfg.flavour} branch needs an absolute "
                         f"position table (the file looks like: {guess_flavour(sd) or 'unknown'})")
    else:
        cls_p, pos, g = _split_pos_embed(sd.pop("pos_embed"), cls_token is not None, source)
        if (g, g) != branch.pos_grid:
            notes.append(f"pos_embed resized {g}x{g} -> {branch.pos_grid[0]}x{branch.pos_grid[1]} (bicubic)")
        pos = resize_pos_embed(pos, (g, g), branch.pos_grid)
        if branch.pos_slot:  # the released layout's unused class slot: keep the checkpoint's value
            pos = torch.cat([cls_p if cls_p is not None else pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        out["pos_embed"] = pos
    for k in ("temporal_pos_embed", "embed_norm.weight", "embed_norm.bias"):  # Uni-Perceiver embedding
        if k in sd:
            out[k] = sd.pop(k)
    if branch.cls_token is not None:
        if cls_token is None:
            raise ValueError(f"{source}: the branch has a class token but the checkpoint has no 'cls_token'")
        if cls_p is not None and cls_pos == "fold":
            cls_token = cls_token + cls_p
            notes.append("class-token position folded into cls_token")
        elif cls_p is not None:
            notes.append("class-token position dropped (cls_pos='drop')")
        out["cls_token"] = cls_token
    elif cls_token is not None:
        notes.append("checkpoint class token (and its position) dropped: branch has none")
    return out


def _blocks(sd: dict[str, Tensor], branch: ViTBranch, notes: list[str]) -> dict[str, Tensor]:
    """The ``blocks.*`` tensors: layer-scale names, BEiT relative position tables resized per window,
    their index buffers regenerated, and layer scale added (identity) or folded as the branch needs."""
    out: dict[str, Tensor] = {}
    gammas_in_ckpt = False
    for k, v in sd.items():
        if not k.startswith("blocks."):
            continue
        new = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        gammas_in_ckpt |= new.endswith((".gamma_1", ".gamma_2"))
        if new.endswith(".attn.relative_position_bias_table"):
            i = int(new.split(".")[1])
            ws = branch.blocks[i].attn.window_size if i < len(branch.blocks) else 0
            if ws > 0 and branch.blocks[i].attn.relative_position_bias_table is not None:
                v, note = resize_rel_pos_table(v, ws)
                if note and note not in notes:
                    notes.append(note)
        out[new] = v
    for i, blk in enumerate(branch.blocks):  # index buffers are regenerated, never read from files
        if blk.attn.relative_position_bias_table is not None:
            out[f"blocks.{i}.attn.relative_position_index"] = relative_position_index(blk.attn.window_size)
    has_ls = branch.blocks[0].gamma_1 is not None if len(branch.blocks) else False
    if has_ls and not gammas_in_ckpt:
        for i, blk in enumerate(branch.blocks):
            out[f"blocks.{i}.gamma_1"] = torch.ones_like(blk.gamma_1, device="cpu")
            out[f"blocks.{i}.gamma_2"] = torch.ones_like(blk.gamma_2, device="cpu")
        notes.append("checkpoint has no layer scale: gamma_1/gamma_2 set to 1 (identity)")
    elif not has_ls and gammas_in_ckpt:
        _fold_layer_scale(out)
        notes.append("checkpoint layer scale folded into attn.proj and mlp.fc2 (branch has no layer scale)")
    return out


def _final_norm_and_head(sd: dict[str, Tensor], head: Optional[nn.Module], notes: list[str],
                         source: str) -> dict[str, Tensor]:
    """The checkpoint's final norm and classifier as ``head``'s state dict (``norm.*``, ``fc.*``);
    any other key left in ``sd`` besides the blocks is an error."""
    rest = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    norm_prefix = "norm." if any(k.startswith("norm.") for k in rest) else "fc_norm."
    tail = {k: v for k, v in rest.items() if k.startswith(("norm.", "fc_norm.", "head."))}
    unexpected = sorted(set(rest) - set(tail))
    if unexpected:
        raise ValueError(f"{source}: unexpected key(s) for a ViT branch: {unexpected}")
    head_sd: dict[str, Tensor] = {}
    if head is not None:
        for k, v in tail.items():
            if k.startswith(norm_prefix):
                head_sd["norm." + k[len(norm_prefix):]] = v
            elif k.startswith("head."):
                head_sd["fc." + k[len("head."):]] = v
        own = head.state_dict()
        for k, v in head_sd.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{source}: classifier {k} has shape {tuple(v.shape)}, the model's is "
                                 f"{tuple(own[k].shape)}; build the model with num_classes={v.shape[0]} or "
                                 f"load with heads=False to keep its own head")
        notes.append("final norm and head loaded into the branch's classification head")
    elif tail:
        notes.append(f"dropped {sorted({k.split('.')[0] for k in tail})} (no per-branch head to receive them)")
    return head_sd


def _fold_layer_scale(sd: dict[str, Tensor]) -> None:
    """gamma * (W x + b) == (gamma W) x + gamma b: move layer scale into the preceding linear layer."""
    for k in [k for k in sd if k.endswith((".gamma_1", ".gamma_2"))]:
        g = sd.pop(k).float()
        base = k.rsplit(".", 1)[0] + (".attn.proj" if k.endswith("_1") else ".mlp.fc2")
        w, b = sd[base + ".weight"], sd[base + ".bias"]
        sd[base + ".weight"] = (w.float() * g[:, None]).to(w.dtype)
        sd[base + ".bias"] = (b.float() * g).to(b.dtype)


def load_pretrained_branches(model: nn.Module, entries: Sequence[Entry], heads: bool = True,
                             cls_pos: str = "fold") -> list[BranchLoadReport]:
    """Load timm-format ViT weights (ConvNeXt branches: any layout of :mod:`piip.weights.convnext`)
    into each branch (finest first); ``None`` leaves a branch as is.

    Entries: a file path (.pth/.bin/.safetensors), a timm model name (downloads), a state dict or
    a timm model. ``heads=False`` keeps a classifier's own heads. Returns one report per branch.
    """
    backbone, cls_heads = _backbone_and_heads(model)
    entries = list(entries)
    n = len(backbone.branches)
    if len(entries) != n:
        raise ValueError(f"pretrained_branches has {len(entries)} entries but the model has {n} branches "
                         f"(finest first; use None to skip a branch)")
    reports = []
    for i, (entry, branch) in enumerate(zip(entries, backbone.branches)):
        if entry is None:
            reports.append(BranchLoadReport(i, None, ["not loaded (None)"]))
            continue
        sd, source = _entry_state_dict(entry, i)
        load = _LOADERS.get(branch.kind)
        if load is None:
            raise ValueError(f"branch {i} is a {type(branch).__name__}; it cannot load pretrained branch weights")
        head = cls_heads[i] if (cls_heads is not None and heads) else None
        notes = load(branch, sd, head, cls_pos, f"pretrained_branches[{i}] ({source})")
        reports.append(BranchLoadReport(i, source, notes))
    return reports


def _load_convnext(branch: ConvNeXtBranch, sd: dict[str, Tensor], head: Optional[nn.Module], cls_pos: str,
                   what: str) -> list[str]:
    """Any layout of :mod:`piip.weights.convnext` into a ConvNeXt branch (no per-branch head)."""
    bsd, notes = convert_convnext(sd, what)
    strict_load(branch, bsd, what)
    return notes


def _load_vit(branch: ViTBranch, sd: dict[str, Tensor], head: Optional[nn.Module], cls_pos: str,
              what: str) -> list[str]:
    """timm-format (CLIP flavour: CLIP-layout) weights into a ViT branch and its classifier head."""
    extra, pre_notes = {}, []
    if branch.cfg.flavour == "clip":  # CLIP layouts -> timm names (+ ln_pre)
        sd, extra, pre_notes = clip_to_timm(sd, what)
    bsd, hsd, notes = convert_timm_vit(sd, branch, head, cls_pos, what)
    bsd.update(extra)
    try:
        strict_load(branch, bsd, what)
    except ValueError as e:
        looks = guess_flavour(sd)
        raise ValueError(f"{e}. The branch is a {branch.cfg.flavour!r} ViT"
                         + (f"; the file looks like {looks}" if looks else "")) from None
    if head is not None:
        strict_load(head, hsd, f"{what} head")
    return pre_notes + notes


# the converter for each branch kind (``Branch.kind``)
_LOADERS = {ViTBranch.kind: _load_vit, ConvNeXtBranch.kind: _load_convnext}


def describe_reports(reports: Sequence[BranchLoadReport]) -> str:
    return "\n".join(f"branch {r.branch} <- {r.source}: " + "; ".join(r.notes or ["as is"]) for r in reports)


__all__ = ["BranchLoadReport", "convert_timm_vit", "load_pretrained_branches", "describe_reports"]
