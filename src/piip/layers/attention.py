"""Self-attention (global or ViTDet windowed) and plain cross-attention, all through SDPA."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.window import window_partition, window_unpartition


class Attention(nn.Module):
    """Multi-head self-attention over a (B, N, C) token sequence.

    With ``window_size > 0`` the tokens (laid out on an H x W grid) are zero-padded to a multiple
    of the window, attended inside each window, and the padding is cropped before the output
    projection, as in ViTDet and the released PIIP code.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, window_size: int = 0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, c)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self.window_size <= 0:
            return self.proj_drop(self.proj(self._attend(x)))
        b, n, c = x.shape
        h, w = hw
        if n != h * w:
            raise ValueError(f"windowed attention needs exactly H*W={h * w} tokens, got {n} "
                             "(class tokens cannot be used with windowed attention)")
        windows, padded = window_partition(x.view(b, h, w, c), self.window_size)
        out = window_unpartition(self._attend(windows), self.window_size, padded, hw)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))


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
