"""Multi-scale deformable attention (Deformable-DETR semantics) without compiled extensions.

The reference implementation samples every level with ``grid_sample``; it is the ground
truth that the faster ones are checked against: ``fused`` (deform_fused.py: one gather-reduce,
analytic backward; auto-selected on CPU except for small training calls) and ``triton``
(deform_triton.py: Triton kernels, auto-selected for CUDA). An implementation may carry
``.supports(value, sampling_locations) -> bool``, consulted only by the automatic choice;
``impl=`` or ``PIIP_DEFORM_IMPL`` force one. It may also carry ``.from_offsets`` for
:func:`ms_deform_attn_points` (the reference-point + offset form), returning None where it does
not apply.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn", "ms_deform_attn_points", "ms_deform_attn_reference", "register_impl", "available_impls",
           "level_layout", "use_impl"]

_IMPLS: Dict[str, Callable[..., Tensor]] = {}


def register_impl(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register an implementation of the op under ``name`` (selectable via PIIP_DEFORM_IMPL)."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _IMPLS[name] = fn
        return fn

    return deco


def available_impls() -> list[str]:
    return sorted(_IMPLS)


LevelShapes = Tuple[Tuple[int, int], ...]
"""(H, W) of each level as Python ints, or symbolic ints (``torch.SymInt``) while tracing."""
ShapesArg = Union[Tensor, Sequence[Sequence[int]]]
StartsArg = Union[Tensor, Sequence[int], None]


def level_layout(spatial_shapes: ShapesArg,
                 level_start_index: StartsArg = None) -> tuple[LevelShapes, Tuple[int, ...]]:
    """Levels' (H, W) and start offsets in S as ints.

    Shapes are metadata: a caller that knows them passes a sequence of ``(h, w)`` ints (or the
    SymInts of a traced input's sizes), which keeps torch.export / torch.compile / meta-device
    forwards free of data-dependent reads. The (L, 2) / (L,) tensors of the Deformable-DETR API
    are still accepted; they are read back here once (``.tolist()``), which is fine eagerly but
    freezes (or breaks) a trace. ``level_start_index`` defaults to the running sum of H * W.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2), got {tuple(spatial_shapes.shape)}")
        shapes: LevelShapes = tuple((h, w) for h, w in spatial_shapes.tolist())
    else:
        shapes = tuple(tuple(hw) for hw in spatial_shapes)  # type: ignore[misc]
        if not shapes or any(len(hw) != 2 for hw in shapes):
            raise ValueError(f"ms_deform_attn: spatial_shapes must be a non-empty sequence of (h, w) pairs, "
                             f"got {spatial_shapes!r}")
    if level_start_index is None:
        starts, acc = [], 0
        for h, w in shapes:
            starts.append(acc)
            acc = acc + h * w
        return shapes, tuple(starts)
    if isinstance(level_start_index, Tensor):
        if level_start_index.shape != (len(shapes),):
            raise ValueError(f"ms_deform_attn: level_start_index must be ({len(shapes)},), "
                             f"got {tuple(level_start_index.shape)}")
        return shapes, tuple(level_start_index.tolist())
    starts_t = tuple(level_start_index)
    if len(starts_t) != len(shapes):
        raise ValueError(f"ms_deform_attn: level_start_index must be ({len(shapes)},), got {len(starts_t)} entries")
    return shapes, starts_t


def _check_inputs(value: Tensor, shapes: LevelShapes, sampling_locations: Tensor, attention_weights: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    num_levels = len(shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    nq, lq, mq, lvl, p, _ = sampling_locations.shape
    if (nq, mq, lvl) != (n, m, num_levels):
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} do not match "
                         f"value {tuple(value.shape)} and {num_levels} level(s)")
    if attention_weights.shape != (n, lq, m, num_levels, p):
        raise ValueError(f"ms_deform_attn: attention_weights must be {(n, lq, m, num_levels, p)}, "
                         f"got {tuple(attention_weights.shape)}")
    total = sum(h * w for h, w in shapes)
    if isinstance(total, int) and isinstance(s, int):
        if total != s:
            raise ValueError(f"ms_deform_attn: spatial_shapes cover {total} positions but value has S={s}")
    else:  # symbolic sizes: a check the tracer proves (or keeps as a runtime assertion), never a read-back
        torch._check(total == s, lambda: f"ms_deform_attn: spatial_shapes cover {total} positions but value has S={s}")


@register_impl("reference")
def ms_deform_attn_reference(value: Tensor, spatial_shapes: ShapesArg,
                             level_start_index: StartsArg,
                             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Per-level bilinear ``grid_sample`` (align_corners=False, zero padding), then weighted sum.

    Cell convention: grid_sample floors ``((g + 1) * size - 1) / 2`` with ``g = 2 * loc - 1`` rounded
    in the input dtype, not the CUDA op's float32 ``loc * size - 0.5`` (which ``fused`` and ``triton``
    follow). Values agree everywhere; at samples exactly on a pixel centre (Deformable-DETR's
    initial locations) the two roundings can pick neighbouring cells and so return the left- or the
    right-hand location gradient of the kink there. A sample at coordinate exactly -1 also counts
    here (zero value, non-zero location gradient), while the CUDA op drops it."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    grids = 2.0 * sampling_locations - 1.0  # [0, 1] -> [-1, 1]
    shapes, starts = level_layout(spatial_shapes, level_start_index)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w]  # (N, HW, M, D)
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Lq, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    w = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p).to(stacked.dtype)
    out = (stacked * w).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


_FORCED: list[str] = []  # innermost use_impl() last


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Run every call without an explicit ``impl=`` on implementation ``name`` inside the block
    (what an exporter uses to pick the implementation that its target format represents)."""
    if name not in _IMPLS:
        raise ValueError(f"unknown deformable-attention implementation {name!r}; available: {available_impls()}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _select_impl(impl: Optional[str], value: Tensor, sampling_locations: Tensor) -> str:
    name = impl or (_FORCED[-1] if _FORCED else "") or os.environ.get("PIIP_DEFORM_IMPL") or ""
    if not name:
        # Best available, fastest first; each declares what it supports.
        for candidate in ("triton", "fused", "reference"):
            if candidate in _IMPLS and _supports(candidate, value, sampling_locations):
                return candidate
        return "reference"
    if name not in _IMPLS:
        raise ValueError(f"unknown deformable-attention implementation {name!r}; "
                         f"available: {available_impls()}")
    return name


def _supports(name: str, value: Tensor, sampling_locations: Tensor) -> bool:
    fn = _IMPLS[name]
    check = getattr(fn, "supports", None)
    return True if check is None else bool(check(value, sampling_locations))


def ms_deform_attn(value: Tensor, spatial_shapes: ShapesArg,
                   level_start_index: StartsArg,
                   sampling_locations: Tensor, attention_weights: Tensor,
                   impl: Optional[str] = None) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) values of all levels, flattened row-major per level.
        spatial_shapes: (H, W) of each level: a sequence of int pairs (what traced / exported code
            must pass, e.g. built from the input's sizes), or an (L, 2) long tensor.
        level_start_index: offset of each level in S: ints, an (L,) tensor, or None (running sum).
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1]; outside reads zeros.
        attention_weights: (N, Lq, M, L, P).
        impl: ``reference`` or another registered name; default from ``PIIP_DEFORM_IMPL`` or the
            fastest available one.
    Returns:
        (N, Lq, M * D)
    """
    shapes, starts = level_layout(spatial_shapes, level_start_index)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    return _IMPLS[_select_impl(impl, value, sampling_locations)](value, shapes, starts, sampling_locations,
                                                                 attention_weights)


def ms_deform_attn_points(value: Tensor, spatial_shapes: ShapesArg, level_start_index: StartsArg,
                          reference_points: Tensor, sampling_offsets: Tensor, attention_weights: Tensor,
                          impl: Optional[str] = None) -> Tensor:
    """:func:`ms_deform_attn` at Deformable-DETR's points ``reference_points + sampling_offsets / (W, H)``
    of each level.

    ``reference_points``: (N or 1, Lq, L, 2) in [0, 1]; ``sampling_offsets``: (N, Lq, M, L, P, 2)
    in pixels of each level. The implementation chosen may sample from this form directly
    (``fused`` eagerly without a gradient: ``ref * size - 0.5 + offset``, one pass a coordinate
    instead of the locations' and the pixel coordinates' three; the same points to float
    rounding, ~1e-5 px). Otherwise the locations are built, as the released code builds them,
    in the offsets' dtype and then cast to the value's."""
    shapes, starts = level_layout(spatial_shapes, level_start_index)
    _check_inputs(value, shapes, sampling_offsets, attention_weights)
    n, lq, num_levels = sampling_offsets.shape[0], sampling_offsets.shape[1], len(shapes)
    if (reference_points.dim() != 4 or reference_points.shape[0] not in (1, n)
            or tuple(reference_points.shape[1:]) != (lq, num_levels, 2)):
        raise ValueError(f"ms_deform_attn_points: reference_points must be ({n} or 1, {lq}, {num_levels}, 2), "
                         f"got {tuple(reference_points.shape)}")
    direct = getattr(_IMPLS[_select_impl(impl, value, sampling_offsets)], "from_offsets", None)
    out = None if direct is None else direct(value, shapes, starts, reference_points, sampling_offsets,
                                             attention_weights)
    if out is not None:
        return out
    locations = torch.addcdiv(reference_points[:, :, None, :, None, :], sampling_offsets,
                              _normalizer(shapes, sampling_offsets))
    # chosen again on the locations: a reference that wants a gradient makes them want one
    return ms_deform_attn(value, shapes, starts, locations.to(value.dtype), attention_weights, impl)


def _normalizer(shapes: LevelShapes, like: Tensor) -> Tensor:
    """(L, 1, 2) tensor of each level's (W, H) in ``like``'s dtype, built from (symbolic) ints by
    tensor-scalar products (a traced graph computes it from the input's sizes), broadcastable
    against (N, Lq, M, L, P, 2) offsets."""
    one = like.new_ones(())
    return torch.stack([torch.stack([one * w, one * h]) for h, w in shapes]).view(len(shapes), 1, 2)
