"""AdamW with layer-wise learning-rate decay over PIIP branch blocks, and warm-up schedules.

Layer ids follow the released ``CustomLayerDecayOptimizerConstructorMMDet`` with L = num_layers + 2
and lr scale ``rate ** (L - 1 - id)``: patch embedding / position table / class token of every
branch get id 0; block i of the *largest* branch (official branch1, our last) gets i + 1; block i
of another branch gets ``(i + 1) * skip_stride`` (official: 1 for TSB, 2 for SBL/TSBL, 1.5 for the
MAE-H branch of H6B/LH6B, i.e. the largest branch's depth over that branch's depth, which is how we
derive it). A fractional id is truncated: the released constructor names its groups ``layer_%d``
and a group's lr scale is that of the parameter that created it, which for every released
config is the largest branch's block ``floor((i + 1) * stride) - 1``; everything else
(interactions, merging, pyramid, neck, heads) gets L - 1 (scale 1), and so does every parameter of
a non-ViT (ConvNeXt) branch: the released hybrids decay ViT branches only. No weight decay on 1-D
parameters and biases (as released; position tables do get weight decay there too).

The ids are the model's: :func:`piip.backbone.layer_ids` asks each branch (``Branch.layer_id``).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..backbone import layer_ids


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: Optional[float] = None,
                 num_layers: Optional[int] = None, skip_strides: Optional[Sequence[float]] = None,
                 lr_scales: Optional[dict[str, float]] = None, decay_all: bool = False,
                 no_decay: Sequence[str] = ()) -> list[dict]:
    """Optimizer groups: (layer id, lr multiplier, decay / no decay), each with its ``lr`` and ``lr_scale``.

    ``lr_scales`` maps regular expressions to lr multipliers: a parameter whose name matches one
    (``re.search``, first match wins) has its lr multiplied by it (e.g. 10x for newly added modules
    when fine-tuning). ``decay_all`` applies weight decay to biases and 1-D parameters too (the
    released classification fine-tuning recipe); by default they get none. Names matching a regex of
    ``no_decay`` (e.g. position tables, class tokens) get none either way."""
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if layer_decay is not None and layer_decay < 1:
        ids, nl = layer_ids(model, num_layers, skip_strides)
    else:
        ids, nl = {}, 0
    rules = [(re.compile(pat), float(mult)) for pat, mult in (lr_scales or {}).items()]
    no_decay_rx = [re.compile(pat) for pat in no_decay]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip_wd = (not decay_all and (p.ndim <= 1 or name.endswith(".bias"))) or any(
            rx.search(name) for rx in no_decay_rx)
        lid = ids.get(name, nl + 1)
        scale = layer_decay ** (nl + 1 - lid) if ids else 1.0
        mult = next((m for rx, m in rules if rx.search(name)), 1.0)
        scale *= mult
        key = f"layer_{lid}_{'no_decay' if skip_wd else 'decay'}" + (f"_x{mult:g}" if mult != 1.0 else "")
        g = groups.setdefault(key, {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
                                    "weight_decay": 0.0 if skip_wd else weight_decay, "group_name": key})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    layer_decay: Optional[float] = None, betas: tuple[float, float] = (0.9, 0.999),
                    **kw) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, layer_decay, **kw)
    for g in groups:
        g.pop("param_names")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


class WarmupSchedule:
    """LR factor at iteration ``it``: linear warm-up from ``warmup_ratio`` (mmdet 'linear'), then
    step decay by ``gamma`` at each milestone (iterations), cosine to ``min_ratio``, or 'poly'
    ``(1 - it / total) ** power`` down to ``min_ratio`` (mmseg, power 1.0)."""

    def __init__(self, total_iters: int, warmup_iters: int = 500, warmup_ratio: float = 1e-3,
                 milestones: Sequence[int] = (), gamma: float = 0.1, kind: str = "step", min_ratio: float = 0.0,
                 power: float = 1.0) -> None:
        if kind not in ("step", "cosine", "poly"):
            raise ValueError(f"schedule kind must be 'step', 'cosine' or 'poly', got {kind!r}")
        self.power = power
        self.total, self.warmup, self.ratio = total_iters, warmup_iters, warmup_ratio
        self.milestones, self.gamma, self.kind, self.min_ratio = sorted(milestones), gamma, kind, min_ratio

    def __call__(self, it: int) -> float:
        if self.kind == "step":
            base = self.gamma ** sum(it >= m for m in self.milestones)
        elif self.kind == "poly":
            t = min(1.0, it / max(1, self.total))
            base = self.min_ratio + (1 - self.min_ratio) * (1 - t) ** self.power
        else:
            t = min(1.0, it / max(1, self.total))
            base = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if it < self.warmup:
            base *= self.ratio + (1 - self.ratio) * it / self.warmup
        return base


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupSchedule,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``min_lr`` > 0 (cosine only): every group anneals to this absolute lr (timm's ``lr_min``),
    whatever its own peak lr."""
    if not min_lr or schedule.kind != "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lambdas = []
    for g in optimizer.param_groups:
        peak = g.get("initial_lr", g["lr"])
        lambdas.append(WarmupSchedule(schedule.total, schedule.warmup, schedule.ratio, schedule.milestones,
                                      schedule.gamma, "cosine", min(1.0, min_lr / peak) if peak > 0 else 0.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
