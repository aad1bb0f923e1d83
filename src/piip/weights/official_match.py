"""What an official checkpoint is, read from its keys and shapes: the TSBL finest-branch width of the
released 4-branch code, and a description (flavours, widths, matching registered models) for errors."""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Callable, Iterable, Mapping

from torch import Tensor

from ..config import PIIPConfig
from .vit_layouts import _GROUP_TEXT, config_group, layout_group

# every registered (name, config): the registry installs its table here (set_known_configs), so the
# weights never import the registry; until then no model is named in the descriptions
_known_configs: Callable[[], Iterable[tuple[str, PIIPConfig]]] = lambda: ()


def set_known_configs(table: Callable[[], Iterable[tuple[str, PIIPConfig]]]) -> None:
    """Where :func:`describe_official_checkpoint` finds the registered models it names."""
    global _known_configs
    _known_configs = table


_BRANCH = re.compile(r"^branch(\d+)\.(.+)$")
_PATCH = ("patch_embed.proj.weight", "visual_embed.patch_embed.proj.weight")


def _official_branches(sd: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """{official branch number: {branch-internal key: tensor}}; a single-branch file is branch 1."""
    keys = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in sd.items()}
    out: dict[int, dict[str, Tensor]] = {}
    for k, v in keys.items():
        m = _BRANCH.match(k)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if not out and any(k in keys for k in _PATCH):
        out[1] = keys
    return out


def _width(branch: Mapping[str, Tensor]) -> int | None:
    for k in _PATCH:
        if k in branch:
            return int(branch[k].shape[0])
    return None


def _pos_len(branch: Mapping[str, Tensor]) -> int | None:
    for k in ("pos_embed", "visual_embed.patch_embed.spatial_pos_embed.weight"):
        if k in branch:
            return int(branch[k].shape[-2])
    return None


def _cfg_pos_len(b) -> int | None:
    g = b.pos_grid or int(b.img_size) // b.patch_size
    return None if b.pos_layout == "none" else g * g + int(b.pos_layout == "learned_cls")


def fit_config_to_checkpoint(cfg: PIIPConfig, sd: Mapping[str, Tensor], source: str = "checkpoint") -> PIIPConfig:
    """TSBL: the released ``piip_4branch.py`` builds its finest branch from the third branch's settings
    (``self.branch4 = vit_models(**branch3)``), so a checkpoint trained with it has a ViT-S finest branch.
    Detect that from the finest branch's width and build it the same way (one warning); otherwise
    return ``cfg`` unchanged (a ViT-T checkpoint builds the ViT-T of the configs)."""
    if len(cfg.branches) != 4:
        return cfg
    finest = _official_branches(sd).get(4)
    width = _width(finest) if finest else None
    if width is None:  # our own layout (save_pretrained / piip convert / a piip training checkpoint)
        w = next((sd[p + "branches.0.patch_embed.proj.weight"] for p in ("", "backbone.", "backbone.body.")
                  if p + "branches.0.patch_embed.proj.weight" in sd), None)
        width = int(w.shape[0]) if w is not None else None
    b0, b1 = cfg.branches[0], cfg.branches[1]
    if width is None or width == b0.embed_dim or width != b1.embed_dim:
        return cfg
    warnings.warn(f"{source}: the finest branch is {width} wide, not {b0.embed_dim}: this checkpoint was trained "
                  f"with the released 4-branch code, which builds the finest branch with the second branch's "
                  f"settings (a ViT-{'S' if width == 384 else width}); building it the same way", UserWarning)
    new0 = dataclasses.replace(b1, img_size=b0.img_size, interaction_groups=b0.interaction_groups)
    return dataclasses.replace(cfg, branches=[new0, *cfg.branches[1:]])


def describe_official_checkpoint(sd: Mapping[str, Tensor]) -> str:
    """'The file looks like ...' for error messages: branches finest first with width and flavour, and the
    registered models with that layout."""
    branches = _official_branches(sd)
    if not branches:
        return "The file has no official branch keys (branchK.patch_embed...); is it an official PIIP checkpoint?"
    n = max(branches)
    finest_first = [branches.get(n - i, {}) for i in range(n)]
    shape = [(_width(b), layout_group(b), _pos_len(b)) for b in finest_first]
    text = ", ".join(f"{w}-wide {_GROUP_TEXT.get(g, 'unknown').split(' (')[0]}" for w, g, _ in shape)
    keys = list(sd)
    proj = any("_proj." in k and ".interaction_units_" in k for k in keys)
    norm = any(".query_norm." in k for k in keys)
    matches = []
    for name, cfg in _known_configs():
        if len(cfg.branches) != n or (n > 1 and (cfg.interaction_proj, cfg.interaction_norm) != (proj, norm)):
            continue
        if all((w, g, p) == (b.embed_dim, config_group(b), _cfg_pos_len(b))
               for (w, g, p), b in zip(shape, cfg.branches)):
            matches.append(name)
    hint = f"registered models with that layout: {', '.join(matches)}" if matches else \
        "no registered model has that layout"
    if n == 4 and shape[0][0] is not None and shape[0][0] == shape[1][0]:
        hint += (" (a finest branch as wide as the next one is the released 4-branch code's build: "
                 "piip.create_model(NAME, checkpoint=...) and `piip convert official` build it that way)")
    return f"The file looks like {n} branch(es), finest first: {text}; {hint}."
