"""Calling an ``nn.Linear`` with its epilogue (GELU, residual add) fused where that is invisible."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..ops.linear import epilogue, linear
from .drop import inactive


def unhooked(mod: nn.Module, kind: type) -> bool:
    """``mod`` is exactly a ``kind`` (not a subclass, wrapper, parametrization or quantized swap),
    no forward hook watches it and no per-instance ``forward`` replaces its own (accelerate's
    device / offload hooks): running its computation fused into a neighbour's changes nothing
    anyone can observe. Otherwise (activation capture, FLOP counting, LoRA, pruning masks) the
    module is called as usual."""
    return (type(mod) is kind and "forward" not in mod.__dict__
            and not (mod._forward_hooks or mod._forward_pre_hooks)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks))


def apply_linear(mod: nn.Module, x: Tensor, act: Optional[str] = None, residual: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None) -> Tensor:
    """``residual + scale * act(mod(x))`` (each optional; ``act`` None, 'gelu' or 'gelu_tanh'),
    fused in one oneDNN call where ``piip.ops.linear`` allows it."""
    if unhooked(mod, nn.Linear):
        return linear(x, mod.weight, mod.bias, act, residual, scale)
    return epilogue(mod(x), act, residual, scale)


def apply_output_linear(mod: nn.Module, x: Tensor, drop: nn.Module, residual: Optional[Tensor] = None,
                        scale: Optional[Tensor] = None) -> Tensor:
    """``residual + scale * drop(mod(x))`` (residual and scale optional): an output projection and
    its dropout, with the (gated) residual fused in where the dropout is inactive."""
    if residual is None and scale is None:
        return drop(apply_linear(mod, x))
    if not inactive(drop):
        return epilogue(drop(apply_linear(mod, x)), None, residual, scale)
    return apply_linear(mod, x, residual=residual, scale=scale)
