"""Deformable cross-attention module (one level per attention in PIIP)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.ms_deform_attn import ShapesArg, StartsArg, level_layout, ms_deform_attn, ms_deform_attn_points
from .linear import apply_linear


class MSDeformAttn(nn.Module):
    """Deformable-DETR attention whose values may be narrower than the query (``ratio``).

    Key layout matches the released PIIP code: sampling_offsets, attention_weights, value_proj,
    output_proj.
    """

    def __init__(self, dim: int, num_heads: int, num_points: int = 4, num_levels: int = 1,
                 ratio: float = 1.0, dim_feat: int | None = None) -> None:
        super().__init__()
        value_dim = int(dim * ratio)
        if value_dim % num_heads:
            raise ValueError(f"MSDeformAttn: value width {value_dim} (dim={dim} x ratio={ratio}) "
                             f"is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.num_points, self.num_levels = dim, num_heads, num_points, num_levels
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim_feat or dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions, one radius per point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor,
                spatial_shapes: ShapesArg, level_start_index: StartsArg = None,
                padding_mask: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                scale: Optional[Tensor] = None, value: Optional[Tensor] = None) -> Tensor:
        """query (N, Lq, C); feat (N, S, C_feat); reference_points (1 or N, Lq, L, 2) points in [0, 1],
        or (N, Lq, L, 4) boxes (cx, cy, w, h): then offsets are in units of half the box over the
        number of points (Deformable-DETR box refinement); padding_mask (N, S) True = padded
        position, whose value is zeroed. ``spatial_shapes``: (h, w) int pairs per level (an (L, 2)
        tensor is accepted eagerly; see :func:`piip.ops.ms_deform_attn.level_layout`). With
        ``residual`` the result is ``residual + scale * attention`` (a gated residual fused into the
        output projection where ``piip.ops.linear`` allows it). ``value``: ``value_proj(feat)`` computed
        by the caller (``feat`` is then not read)."""
        spatial_shapes, level_start_index = level_layout(spatial_shapes, level_start_index)
        n, lq, _ = query.shape
        value = apply_linear(self.value_proj, feat) if value is None else value
        s = value.shape[1]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.num_heads, self.value_dim // self.num_heads)
        offsets = apply_linear(self.sampling_offsets, query).view(n, lq, self.num_heads, self.num_levels, self.num_points, 2)
        weights = apply_linear(self.attention_weights, query).view(n, lq, self.num_heads, self.num_levels * self.num_points)
        weights = softmax_last(weights).view(n, lq, self.num_heads, self.num_levels, self.num_points)
        # sampling runs in at least float32, as the released code does, for bf16/fp16 models
        dt = torch.promote_types(value.dtype, torch.float32)
        v, a = value.to(dt), weights.to(dt)
        if reference_points.shape[-1] == 4:
            ref = reference_points[:, :, None, :, None]
            locations = ref[..., :2] + offsets / self.num_points * ref[..., 2:] * 0.5
            out = ms_deform_attn(v, spatial_shapes, level_start_index, locations.to(dt), a)
        else:
            out = ms_deform_attn_points(v, spatial_shapes, level_start_index, reference_points, offsets, a)
        return apply_linear(self.output_proj, out.to(value.dtype), residual=residual, scale=scale)


def softmax_last(x: Tensor) -> Tensor:
    """Softmax over the last dim. PIIP's is 4 wide (1 level x 4 points), where PyTorch's CPU kernel,
    vectorised along that dim, takes ~9x longer than the same softmax over a middle dim
    (benchmarks/micro_ops.py); under compile / export or on GPU the plain op is kept."""
    if x.shape[-1] >= 16 or x.is_cuda or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return F.softmax(x, -1)
    return F.softmax(x.movedim(-1, -2).contiguous(), -2).movedim(-2, -1).contiguous()

