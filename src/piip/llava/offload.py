"""Accelerate offload (``device_map`` with 'cpu' / 'disk' entries) for modules run through methods
other than ``forward``.

Accelerate's hooks load a module's offloaded weights around its ``forward`` only; the PIIP tower is
run through ``forward_branches`` (branch ``embed`` / ``forward_group`` read their own position tables
and class tokens directly), so those weights would still be on the meta device.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its weights' device."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(dev) if dev is not None else next(module.parameters()).device


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Every offloaded weight in ``module``'s tree on its execution device for the duration."""
    hooked = [m for m in module.modules() if hasattr(m, "_hf_hook")]
    if not hooked:   # no accelerate dispatch: nothing to do (and no accelerate import)
        yield
        return
    from accelerate.utils import align_module_device, has_offloaded_params
    with contextlib.ExitStack() as stack:
        for m in hooked:
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield
