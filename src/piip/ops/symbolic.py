"""Shape helpers for code that runs both eagerly and under tracers (torch.compile, torch.export,
torch.jit.trace, FakeTensor / meta forwards), where sizes may be symbolic and caches or
size-dependent branches would freeze one size into the traced graph."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def tracing() -> bool:
    """True while a tracer records the forward (Dynamo / torch.export, or the TorchScript tracer of
    torch.jit.trace and the legacy ONNX exporter)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def grad_wanted(*tensors: Tensor) -> bool:
    """Autograd would record an op on these tensors (grad mode on and one of them requires grad):
    what decides between a path with a backward and an inference-only one."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``v`` as an (h, w) pair of ints: an int for both, or a two-element sequence (a conv's
    ``stride``, an export's example size)."""
    if isinstance(v, int):
        return v, v
    h, w = v
    return int(h), int(w)


def concrete(sizes: Sequence[object]) -> bool:
    """All sizes are plain Python ints (not SymInts, not the 0-dim tensors jit.trace hands out)."""
    return all(type(s) is int for s in sizes)


PLAIN_TYPES = (Tensor, torch.nn.Parameter)   # no subclass: no Proxy, FakeTensor, DTensor


def real(t: Tensor) -> bool:
    """``t`` holds data (not a meta or fake tensor): it may key a cache and be read back."""
    if t.device.type == "meta":
        return False
    if type(t) in PLAIN_TYPES and not (torch._C._is_fake_tensor(t) or torch._is_functional_tensor(t)):
        return True    # what is_fake concludes for a plain tensor: 0.76 against 2.31 us a call
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)


def same_sizes(a: Sequence[object], b: Sequence[object]) -> bool:
    """``a == b`` when both are concrete; for symbolic sizes only when provably equal (no guard)."""
    if concrete(a) and concrete(b):
        return tuple(a) == tuple(b)
    if len(a) != len(b) or torch.jit.is_tracing():
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return all(statically_known_true(x == y) for x, y in zip(a, b))
