"""Inference-time fold of an interaction edge's feature path ``value_proj(norm(proj(x)))``.

An edge from a narrow, fine branch into a wider one (T -> S, S -> B) projects every one of the
fine branch's many tokens up (d_in -> d_out), LayerNorms it and projects it again to the value
width v: d_in*d_out + d_out*v multiply-adds a token, for a result that depends on x only through
d_in numbers. LayerNorm's centring is linear, so with ``C W_p = Q R`` (reduced QR, Q orthonormal
d_out x k, k = min(d_in, d_out)) and ``c = C b_p = Q Q^T c + c_perp``:

    u = R x + Q^T c                          (k numbers a token)
    var = (|u|^2 + |c_perp|^2) / d_out        (Q has orthonormal columns)
    value = (W_v diag(gamma) (Q u + c_perp)) * rsqrt(var + eps) + W_v beta + b_v

i.e. two GEMMs of k*d_in + v*k: half the stock cost at PIIP's fine-to-coarse edges (d_out = 2 d_in,
v = d_in), where the path ran 1.99-2.41x faster on one core (``benchmarks/fold_feat.py``). With
the norm an Identity (the released '_speedup' configs) the two linears are one.

Taken only where nobody can tell (:func:`piip.ops.linear.unobserved`: no gradient wanted, no
autocast, no dispatch mode, no export or ``jit.trace``; float32 / float64) and the three modules are
exactly the stock ones with no hooks. Under ``torch.compile`` (inference) it is one opaque custom op,
``piip::folded_feat``, whose weights are graph inputs. The folded weights are computed in float64 on
first use and cached by the weights' identity (``piip.ops.derived``: address, storage alive,
version counter), so any change of a weight, in place or by replacement, refolds; weights made
under ``inference_mode`` (no version counter) keep the stock computation. Results equal the stock
path to float32 rounding (below 1e-6 of the largest output on the PIIP-TSB models).
``PIIP_FOLD=0`` in the environment, or ``set_enabled(False)``, turns it off.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import derived
from ..ops.linear import linear, unobserved
from ..ops.switch import Switch
from .linear import unhooked

_SWITCH = Switch("PIIP_FOLD")
set_enabled, enabled = _SWITCH.set, _SWITCH.get
_DTYPES = (torch.float32, torch.float64)
# the fold must save at least this share of the stock multiply-adds to be worth a second rounding
_MAX_COST = 0.75


class Folded(NamedTuple):
    """``x -> (x @ r.T + rb) -> value``: with ``a`` None a plain linear ``(r, rb)``; otherwise the
    normalised form above (``r``, ``rb`` = R, Q^T c; ``a``, ``ab`` = W_v diag(gamma) Q, W_v diag(gamma)
    c_perp; ``b`` = W_v beta + b_v; ``k2`` = |c_perp|^2)."""

    r: Tensor
    rb: Tensor
    a: Optional[Tensor] = None
    ab: Optional[Tensor] = None
    b: Optional[Tensor] = None
    k2: float = 0.0
    width: int = 0
    eps: float = 0.0


def fold(wp: Tensor, bp: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor], wv: Tensor,
         bv: Optional[Tensor], eps: Optional[float]) -> Folded:
    """The folded weights of ``linear(norm(linear(x, wp, bp)), wv, bv)``, ``norm`` a LayerNorm
    (``gamma``, ``beta``, ``eps``; absent affine weights are ones / zeros) or, with ``eps`` None, an
    Identity. Computed in float64, returned in ``wp``'s dtype."""
    dtype = wp.dtype
    with torch.no_grad():
        wp, wv = wp.double(), wv.double()
        bp = bp.double() if bp is not None else wp.new_zeros(wp.shape[0])
        bv = bv.double() if bv is not None else wv.new_zeros(wv.shape[0])
        if eps is None:
            return Folded((wv @ wp).to(dtype), (wv @ bp + bv).to(dtype))
        d = wp.shape[0]
        gamma = gamma.double() if gamma is not None else wp.new_ones(d)
        beta = beta.double() if beta is not None else wp.new_zeros(d)
        q, r = torch.linalg.qr(wp - wp.mean(0, keepdim=True))     # C W_p = Q R
        c = bp - bp.mean()
        rb = q.T @ c
        c_perp = c - q @ rb
        wg = wv * gamma
        return Folded(r.to(dtype), rb.to(dtype), (wg @ q).to(dtype), (wg @ c_perp).to(dtype),
                      (wv @ beta + bv).to(dtype), float(c_perp @ c_perp), d, float(eps))


def apply_folded(f: Folded, x: Tensor) -> Tensor:
    u = linear(x, f.r, f.rb)
    if f.a is None:
        return u
    rs = torch.linalg.vector_norm(u, dim=-1, keepdim=True).square_().add_(f.k2).div_(f.width).add_(f.eps).rsqrt_()
    return torch.addcmul(f.b, linear(u, f.a, f.ab), rs)


def profitable(d_in: int, d_out: int, norm: bool) -> bool:
    """Whether the fold saves enough multiply-adds a token (always, without a norm): it costs
    k * (d_in + v) against the stock d_out * (d_in + v), k = min(d_in, d_out)."""
    return not norm or min(d_in, d_out) <= _MAX_COST * d_out


def _folded(x: Tensor, eps: Optional[float], *weights: Optional[Tensor]) -> Tensor:
    # weights the cache cannot track (made under inference_mode: no version counter; compiled
    # graphs get here too): the stock expression, uncached
    if not derived.trackable(weights):
        wp, bp, gamma, beta, wv, bv = weights
        y = F.linear(x, wp, bp)
        y = y if eps is None else F.layer_norm(y, y.shape[-1:], gamma, beta, eps)
        return F.linear(y, wv, bv)
    return apply_folded(derived.cached("fold", weights, lambda: fold(*weights, eps), eps), x)


@torch.library.custom_op("piip::folded_feat", mutates_args=())
def _folded_op(x: Tensor, wp: Tensor, bp: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
               wv: Tensor, bv: Optional[Tensor], eps: Optional[float]) -> Tensor:
    """The fold as one opaque op of a compiled inference graph (its weights are the graph's inputs,
    the cache lookup runs at call time)."""
    return _folded(x, eps, wp, bp, gamma, beta, wv, bv)


@_folded_op.register_fake
def _(x: Tensor, wp: Tensor, bp: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
      wv: Tensor, bv: Optional[Tensor], eps: Optional[float]) -> Tensor:
    return x.new_empty((*x.shape[:-1], wv.shape[0]))


def folded_path(proj: nn.Module, norm: nn.Module, out: nn.Module, x: Tensor) -> Optional[Tensor]:
    """``out(norm(proj(x)))`` through the fold where it applies and pays, else None (the caller
    runs the stock modules)."""
    if not (_SWITCH.on and type(proj) is nn.Linear and type(out) is nn.Linear
            and type(norm) in (nn.LayerNorm, nn.Identity) and x.dtype in _DTYPES and x.dim() >= 2):
        return None
    has_norm = type(norm) is nn.LayerNorm
    if has_norm and tuple(norm.normalized_shape) != (proj.out_features,):
        return None
    if not profitable(proj.in_features, proj.out_features, has_norm):
        return None
    weights = (proj.weight, proj.bias, getattr(norm, "weight", None), getattr(norm, "bias", None),
               out.weight, out.bias)
    if not unobserved(x, *weights) or not all(unhooked(m, type(m)) for m in (proj, norm, out)):
        return None
    eps = float(norm.eps) if has_norm else None
    if torch.compiler.is_compiling():
        return _folded_op(x, *weights, eps)
    if not derived.trackable(weights):
        return None
    return _folded(x, eps, *weights)
