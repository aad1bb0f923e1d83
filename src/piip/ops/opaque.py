"""Eager CPU kernels as opaque ops of compiled inference graphs.

Inductor lowers most of PIIP's small ops into its own C++ loops. For a few of them its code is
slower on CPU than the eager kernel piip already uses, measured in one compiled PIIP-TSB 1120
forward (issue 27, docs/performance.md): the bicubic resize of the position tables, which eager
inference keeps between calls and a graph recomputes on every call; the coarser branches'
bilinear input views; the deformable sampling's geometry; the ConvFFN's depthwise conv, which
eager runs channels-last; the pyramid's transposed convolutions, whose eager pixel shuffle writes
the output in one pass. With them the compiled as-built forward ran 1.04x faster, as fast as
eager (``benchmarks/opaque_ops.py``). A sixth, wide 3x3 convolutions (the merge's, the UperNet
head's) through Winograd's F(2x2, 3x3) (``ops/winograd.py``), is an algorithm Inductor does not use
for convolutions. Each of these
registers a ``torch.library.custom_op`` next to its eager code, whose body is that eager code, so
a compiled inference graph calls it as one opaque kernel and Inductor fuses everything around it.

Taken only where :func:`wanted` says so: while ``torch.compile`` traces (never under export, whose
graphs must not depend on piip), on plain CPU tensors of which no gradient is wanted, no autocast.
So training graphs keep the traced expressions, which Inductor differentiates (only the input
image's resized views, which need no gradient, take the op there), and so do GPU graphs.
``PIIP_OPAQUE_OPS=0`` in the environment, or :func:`set_enabled`, turns them off.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .linear import unobserved
from .switch import Switch

# (graphs compiled before a change keep what they traced)
_SWITCH = Switch("PIIP_OPAQUE_OPS")
set_enabled, enabled = _SWITCH.set, _SWITCH.get


def wanted(*tensors: Optional[Tensor]) -> bool:
    """A compiled (not exported) CPU inference graph is being traced over these plain tensors."""
    if not (_SWITCH.on and torch.compiler.is_compiling()):
        return False
    # unobserved: plain tensors on one device, no gradient, no autocast, not exporting
    return unobserved(*tensors) and next(t for t in tensors if t is not None).device.type == "cpu"
