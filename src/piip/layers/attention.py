"""Self-attention (global or ViTDet windowed) and plain cross-attention, all through SDPA."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear import linear
from ..ops.window import window_partition, window_unpartition
from .linear import apply_linear, apply_output_linear
from .norm import make_norm


class Attention(nn.Module):
    """Multi-head self-attention over a (B, N, C) token sequence.

    With ``window_size > 0`` the tokens (laid out on an H x W grid) are zero-padded to a multiple
    of the window, attended inside each window, and the padding is cropped before the output
    projection, as in ViTDet and the released PIIP code.

    ``qkv_bias='qv'`` (BEiT) holds separate ``q_bias`` / ``v_bias`` and no key bias.
    ``rel_pos_bias`` (BEiT, windowed only) adds a learned bias per relative offset inside each
    window, from a ``(2w-1)^2 x heads`` table indexed by ``relative_position_index``.
    ``qk_norm`` (InternViT-6B) normalises queries and keys over the full width, before the head
    split, with norms ``q_norm`` / ``k_norm`` of kind ``norm`` ('ln' | 'rms').
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: Union[bool, str] = True, window_size: int = 0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rel_pos_bias: bool = False,
                 qk_norm: bool = False, norm: str = "ln", norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"Attention: qkv_bias must be True, False or 'qv', got {qkv_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if rel_pos_bias:
            if window_size <= 0:
                raise ValueError("Attention: a relative position bias needs windowed attention (window_size > 0)")
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(window_size))
        else:
            self.relative_position_bias_table = None
        self.q_norm = make_norm(norm, dim, norm_eps) if qk_norm else None
        self.k_norm = make_norm(norm, dim, norm_eps) if qk_norm else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: Tensor) -> Tensor:
        if self.q_bias is None:
            return apply_linear(self.qkv, x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return linear(x, self.qkv.weight, bias)

    def _bias(self, n: int, dtype: torch.dtype) -> Optional[Tensor]:
        if self.relative_position_bias_table is None:
            return None
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1).to(dtype)  # heads, N, N

    def _attend(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self._qkv(x)
        if self.q_norm is not None:
            q, k, v = qkv.split(c, dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(n, q.dtype),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, c)

    def forward(self, x: Tensor, hw: tuple[int, int], residual: Optional[Tensor] = None,
                scale: Optional[Tensor] = None) -> Tensor:
        """``residual + scale * attention(x)`` when ``residual`` is given (one fused write-out where possible)."""
        if self.window_size <= 0:
            return apply_output_linear(self.proj, self._attend(x), self.proj_drop, residual, scale)
        b, n, c = x.shape
        h, w = hw
        if n != h * w:
            raise ValueError(f"windowed attention needs exactly H*W={h * w} tokens, got {n} "
                             "(class tokens cannot be used with windowed attention)")
        windows, padded = window_partition(x.view(b, h, w, c), self.window_size)
        out = window_unpartition(self._attend(windows), self.window_size, padded, hw)
        return apply_output_linear(self.proj, out.reshape(b, n, c), self.proj_drop, residual, scale)


def relative_position_index(window: int) -> Tensor:
    """(w*w, w*w) index into a (2w-1)^2 table: row offset * (2w-1) + column offset (BEiT / Swin order)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class CrossAttention(nn.Module):
    """Regular multi-head cross-attention (the ablation alternative to deformable attention)."""

    def __init__(self, dim: int, num_heads: int, dim_feat: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by num_heads={num_heads}")
        dim_feat = dim_feat or dim
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim_feat, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim_feat, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, feat: Tensor) -> Tensor:
        b, nq, c = query.shape
        nk = feat.shape[1]
        hd = c // self.num_heads
        q = self.wq(query).view(b, nq, self.num_heads, hd).transpose(1, 2)
        k = self.wk(feat).view(b, nk, self.num_heads, hd).transpose(1, 2)
        v = self.wv(feat).view(b, nk, self.num_heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, c))
