"""``torch.utils.flop_counter`` as the benchmarks use it: with CPU attention counted.

torch 2.14's counter has formulas for the CUDA attention kernels only. On CPU,
``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``, which it did
not count, so every benchmark's "counted" FLOPs left attention out of both models until 2026-12-07.
ViTDet-B's attention (four of its twelve blocks global) is about a quarter of its multiply-adds,
PIIP-TSB's 5 %, so the counted PIIP / ViTDet ratios came out too high: trunk 0.633 instead of 0.507, as built 0.863 instead of 0.702 (PIIP-TSB
1120 against ViTDet-B 1024). The benchmarks count through :func:`macs_by_op` / :func:`counted_macs`,
which register the missing formulas (forward and backward) first; a later torch that has its own
keeps them. ``piip.complexity`` counts attention itself and is not affected.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)


def count_cpu_attention() -> None:
    """Register the CPU attention formulas where torch has none (idempotent)."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_registry:
        register_flop_formula(fwd)(lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    if bwd is not None and bwd not in flop_registry:
        register_flop_formula(bwd)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v))


def macs_by_op(fn: Callable[[], Any]) -> dict[str, float]:
    """Multiply-adds (half of torch's FLOPs) per counted op ('aten.mm', ...) of what ``fn`` runs:
    matrix products, convolutions and attention."""
    count_cpu_attention()
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(op): flops / 2 for op, flops in fc.get_flop_counts().get("Global", {}).items()}


def counted_macs(fn: Callable[[], Any]) -> float:
    """All multiply-adds :func:`macs_by_op` counts."""
    return sum(macs_by_op(fn).values())
