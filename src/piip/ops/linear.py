"""Linear layers with their epilogue (GELU, residual add) for eager CPU inference, through oneDNN.

PyTorch's CPU ``F.linear`` runs float32 GEMMs on MKL and each epilogue as its own pass over the
output. oneDNN's inner product (the op Inductor itself emits, ``mkldnn::_linear_pointwise``) ran
the ViT shapes 7-14 % faster on one core of an AVX2 EPYC (on an AVX-512 / AMX Xeon: equal at
the narrow shapes, 1-8 % slower at the wide ones), and fuses the bias, the MLP's GELU and the
block's (gated) residual add into the GEMM's write-out (``benchmarks/onednn_linear.py``). Whole
eager forwards got 6-19 % faster, PIIP and the ViT baselines alike (docs/performance.md).

The op has no autograd formula and is invisible to ``torch.utils.flop_counter`` and to tracers,
so it is taken only where nothing can tell: a plain CPU float32 tensor (bfloat16 where oneDNN has
the bf16 inner product), no gradient
wanted, no autocast, no dispatch mode (FlopCounterMode, FakeTensorMode), no export or
``jit.trace``. Everything else gets the stock expression. Results equal the stock path to float
rounding (GEMM identical here; a fused add may round once differently). ``PIIP_ONEDNN_LINEAR=0``
in the environment, or ``set_enabled(False)``, turns the path off. Which GEMM engine is faster
depends on the CPU; ``set_tuning(True)`` (``PIIP_LINEAR_TUNE=1``) times oneDNN against MKL on first
use of each call shape and keeps the faster.

Weights of up to 1M elements are kept in oneDNN's blocked layout between calls
(:func:`set_prepack`), which the narrow branches' GEMMs gain most from.

Under ``torch.compile`` (inference only, never export) the call goes through the custom op
``piip::onednn_linear``, which Inductor runs as an opaque kernel between its own fused loops.
Inductor's lowering of ``mkldnn::_linear_pointwise`` itself needs the weights frozen into the
graph as constants ("weight must be a graph constant"), and its unfrozen graphs call MKL.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import derived
from .switch import Switch
from .symbolic import PLAIN_TYPES, grad_wanted, tracing

ACTS = (None, "gelu", "gelu_tanh")
_SWITCH = Switch("PIIP_ONEDNN_LINEAR")


def _op_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _op_available()


def _bf16_supported() -> bool:
    """oneDNN runs bfloat16 inner products only on CPUs with the instructions for them (AVX-512
    BF16 / AMX, or the Arm equivalents); elsewhere bf16 models keep ``F.linear``."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_DTYPES = (torch.float32, torch.bfloat16) if _AVAILABLE and _bf16_supported() else (torch.float32,)


def set_enabled(flag: bool) -> bool:
    """Turn the oneDNN path on or off (process-wide); returns the previous setting."""
    return _SWITCH.set(flag)


def enabled() -> bool:
    """Whether eligible calls take the oneDNN path (the switch is on and the op is built in)."""
    return _SWITCH.on and _AVAILABLE


def _onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, residual: Optional[Tensor]) -> Tensor:
    """The oneDNN call: ``act`` is 'none', 'gelu' or 'gelu_tanh'; a residual only with 'none'."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    attr, algo = ("none", "") if act == "none" else ("gelu", "tanh" if act == "gelu_tanh" else "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algo)


def _register_compiled_op():
    """``piip::onednn_linear``: :func:`_fused` as a custom op, opaque to Dynamo and Inductor, so a
    compiled graph runs the eager call (kept gated and packed weights included) at run time."""
    @torch.library.custom_op("piip::onednn_linear", mutates_args=())
    def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str,
                      residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
        return _fused(x, weight, bias, act, residual, scale)

    @onednn_linear.register_fake
    def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, residual: Optional[Tensor],
          scale: Optional[Tensor]) -> Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    return onednn_linear


_COMPILED_OP = _register_compiled_op() if _AVAILABLE else None


def unobserved(*tensors: Optional[Tensor]) -> bool:
    """Nothing can tell how these tensors' computation is carried out: plain tensors (no Proxy,
    FakeTensor, DTensor or other subclass), one device and dtype, no gradient wanted, no autocast,
    no dispatch mode (FlopCounterMode, fake tensors), no export or ``jit.trace``. Under
    ``torch.compile`` (not export) it is True too: callers that cannot be traced check
    ``torch.compiler.is_compiling()`` themselves."""
    ts = [t for t in tensors if t is not None]
    if not ts or any(type(t) not in PLAIN_TYPES for t in ts):
        return False
    if any(t.device != ts[0].device or t.dtype != ts[0].dtype for t in ts):
        return False
    if grad_wanted(*ts):
        return False
    if ts[0].device.type == "meta" or torch.is_autocast_enabled(ts[0].device.type):
        return False    # (meta: autocast has no such device; nothing is computed there anyway)
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting()
    return not (tracing() or _get_current_dispatch_mode() is not None)


def _eligible(x: Tensor, *others: Optional[Tensor]) -> bool:
    if not (_SWITCH.on and _AVAILABLE and torch.backends.mkldnn.enabled):
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    return unobserved(x, *others)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: Optional[str] = None,
           residual: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """``residual + scale * act(x @ weight.T + bias)``, each term optional; ``act`` is None, 'gelu'
    (erf) or 'gelu_tanh'; ``scale`` is a per-output-channel gate (layer scale, the interaction
    units' gammas). An activation cannot be combined with a residual or a scale.

    Fused, the scale is folded into the weight and bias (``scale * W``), so a gated residual is one
    GEMM write-out. The gated weight is kept between calls where its weights' state can be tracked
    (:func:`_keep`); otherwise it costs out x in multiplies a call, and with fewer rows than
    input features the output is gated instead (:func:`_scale_weight`)."""
    if act not in ACTS:
        raise ValueError(f"linear: act must be one of {ACTS}, got {act!r}")
    if act is not None and (residual is not None or scale is not None):
        raise ValueError("linear: an activation cannot be fused together with a residual or a scale")
    if (_eligible(x, weight, bias, residual, scale)
            and (scale is None or scale.shape == weight.shape[:1])
            and (residual is None or residual.shape == x.shape[:-1] + weight.shape[:1])):
        call = _COMPILED_OP if torch.compiler.is_compiling() else _fused
        return call(x, weight, bias, act or "none", residual, scale)
    return epilogue(F.linear(x, weight, bias), act, residual, scale)


def _fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, residual: Optional[Tensor],
           scale: Optional[Tensor]) -> Tensor:
    """The oneDNN call of :func:`linear` on concrete tensors: eagerly, or as the body of
    ``piip::onednn_linear`` when a compiled graph runs. ``scale`` is per output channel and
    ``residual`` has the output's shape (the caller checked)."""
    call = _tuned if _TUNING.on else _onednn
    pack = call is _onednn and _prepack(x)
    # the weights' state is checked only where something derived from them would be read
    keep = (pack or scale is not None) and _keep(weight, bias, scale)
    pack = pack and keep
    if scale is not None:
        if not keep and not _scale_weight(x):
            y = call(x, weight, bias, "none", None)
            return y * scale if residual is None else torch.addcmul(residual, y, scale)
        w, b, s = weight, bias, scale
        weight, bias = (derived.cached("gated", (w, b, s), lambda: _gated(w, b, s, pack), pack) if keep
                        else _gated(w, b, s))
    elif pack:
        w = weight
        weight = derived.cached("packed", (w,), lambda: _packed(w))
    return call(x, weight, bias, act, residual)


def set_tuning(flag: bool) -> bool:
    """Time oneDNN against MKL (+ the epilogue as separate ops) on first use of each call shape and
    keep the faster (process-wide, off by default, ``PIIP_LINEAR_TUNE=1``); returns the previous
    setting. Which engine wins depends on the CPU: on an AVX2 EPYC oneDNN was 7-14 % faster at every
    ViT shape, on an AVX-512 / AMX Xeon 1-8 % slower at the wide ones (docs/performance.md). Off by
    default because the two engines round differently, so a process's outputs would depend on
    timings (as ``torch.backends.cudnn.benchmark`` is off by default)."""
    return _TUNING.set(flag)


def tuning() -> bool:
    """Whether eligible calls time the two GEMM engines per call shape (:func:`set_tuning`)."""
    return _TUNING.on


_TUNING = Switch("PIIP_LINEAR_TUNE", default=False)
# (rows rounded up to a power of two, in, out, act, residual?, dtype) -> True: oneDNN is faster
_CHOICES: dict[tuple, bool] = {}
_TRIALS = 2   # timed runs of each engine after one warm-up run
_clock = time.perf_counter


def _tuned(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, residual: Optional[Tensor]) -> Tensor:
    """:func:`_onednn`, or the stock expression where that measured faster for this shape."""
    rows = x.numel() // x.shape[-1]
    key = (1 << max(rows - 1, 0).bit_length(), x.shape[-1], weight.shape[0], act, residual is not None, x.dtype)
    runs = {True: lambda: _onednn(x, weight, bias, act, residual),
            False: lambda: epilogue(F.linear(x, weight, bias), None if act == "none" else act, residual)}
    choice = _CHOICES.get(key)
    if choice is not None:
        return runs[choice]()
    best: dict[bool, float] = {True: float("inf"), False: float("inf")}
    outs: dict[bool, Tensor] = {}
    for i in range(_TRIALS + 1):
        for engine, run in runs.items():
            t = _clock()
            outs[engine] = run()
            if i:
                best[engine] = min(best[engine], _clock() - t)
    choice = _CHOICES[key] = best[True] <= best[False]
    return outs[choice]


# weights up to this size get their derived forms kept between calls (a gate folded in, the oneDNN
# layout): every weight of the narrow branches and interaction units, the 768-wide attention
# projections; a ViT-B MLP weight (2.4M) or a 6B model's weights are not doubled in memory
_KEEP_MAX = 1 << 20
_PREPACK = Switch("PIIP_ONEDNN_PREPACK")


def set_prepack(flag: bool) -> bool:
    """Keep float32 weights of up to 1M elements in oneDNN's blocked layout between eager calls
    (on by default, ``PIIP_ONEDNN_PREPACK=0`` turns it off); returns the previous setting.

    oneDNN otherwise re-lays the weight out on every call. Kept, the GEMMs of PIIP's narrow
    branches ran 1.06-1.10x faster on an AVX-512 Xeon and whole PIIP forwards 1.02-1.03x, with
    identical results (docs/performance.md). The price is a second copy of those weights
    while the model lives (freed with it)."""
    return _PREPACK.set(flag)


def prepacking() -> bool:
    """Whether eager float32 calls keep their (small enough) weights prepacked (:func:`set_prepack`)."""
    return _PREPACK.on


def _prepack(x: Tensor) -> bool:
    """Whether this call reads a prepacked weight: float32 (bf16 not measured) and more than one
    row (a single row takes another oneDNN kernel, whose results the prepacked one does not match)."""
    return _PREPACK.on and x.dtype == torch.float32 and x.numel() > x.shape[-1]


def _packed(weight: Tensor) -> Tensor:
    """``weight`` in oneDNN's own layout for ``mkldnn::_linear_pointwise`` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _gated(weight: Tensor, bias: Optional[Tensor], scale: Tensor,
           pack: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    w = weight * scale[:, None]
    return _packed(w) if pack else w, None if bias is None else bias * scale


def _keep(weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor]) -> bool:
    """Whether what an eager call derives from its weights (the gated weight, the packed layout)
    is kept by :mod:`piip.ops.derived`, computed once per weight state: small enough, and
    weights whose changes can be seen."""
    return weight.numel() <= _KEEP_MAX and derived.trackable((weight, bias, scale))


def _scale_weight(x: Tensor) -> bool:
    """Whether a gate is folded into the weight (out x in multiplies, then one fused write-out)
    rather than applied to the GEMM's output (rows x out, one ``addcmul``): the cheaper of the two,
    i.e. when there are at least as many rows as input features. A classifier's coarse branch
    (65 tokens an image, 3072 features into fc2) spent more on scaling the weight than it saved."""
    return x.numel() >= x.shape[-1] * x.shape[-1]


def epilogue(y: Tensor, act: Optional[str] = None, residual: Optional[Tensor] = None,
             scale: Optional[Tensor] = None) -> Tensor:
    """``residual + scale * act(y)`` as separate ops: the stock path of :func:`linear`, and of a
    layer that cannot be fused (hooked, wrapped, followed by an active dropout)."""
    if act is not None:
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    if scale is not None:
        y = scale * y
    return y if residual is None else residual + y
