"""Exponential moving average of a model's weights (timm ``ModelEma`` semantics)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step for floating-point
    parameters and buffers; integer buffers (counters) are copied. Kept in float32 on the model's
    device; :meth:`state_dict` / :meth:`load_state_dict` make resuming exact."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mine = self.module.state_dict()
        for k, v in model.state_dict().items():
            e = mine[k]
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(v.detach().to(e.dtype), alpha=1.0 - self.decay)
            else:
                e.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
