"""Feed-forward layers: the ViT MLP and the interaction unit's ConvFFN."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import opaque
from .conv import Conv2d, channels_last_conv
from .linear import apply_linear, apply_output_linear, unhooked


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTS = ("gelu", "gelu_tanh", "quick_gelu")


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (timm key layout: fc1, fc2). ``act='gelu_tanh'`` is the tanh
    approximation flash-attn's FusedMLP computes (the released '_speedup' / InternViT configs);
    ``act='quick_gelu'`` is OpenAI CLIP's."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"Mlp: act must be one of {_ACTS}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
        """``residual + scale * mlp(x)`` when ``residual`` is given (one fused write-out where possible)."""
        if unhooked(self.act, nn.GELU):   # fused into fc1 where piip.ops.linear allows it
            h = apply_linear(self.fc1, x, act="gelu_tanh" if self.act.approximate == "tanh" else "gelu")
        else:
            h = self.act(apply_linear(self.fc1, x))
        return apply_output_linear(self.fc2, self.drop(h), self.drop, residual, scale)


class DWConv(nn.Module):
    """3x3 depthwise convolution applied to tokens laid out on their H x W grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=True)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        conv = self.dwconv
        if opaque.wanted(x, conv.weight, conv.bias) and unhooked(conv, Conv2d):
            # compiled inference: the eager channels-last call below as one opaque op; Inductor's
            # own conv on the contiguous map (next) took 2-3x its time at PIIP-TSB's shapes
            return _dwconv_tokens_op(x, conv.weight, conv.bias, hw[0], hw[1])
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        # the (B, N, C) -> NCHW view above is channels-last strided. Compiled, Inductor cannot order
        # that view's strides once H / W are symbolic ("cannot determine truth value of Relational:
        # 8*s12 < 8"), so it gets a contiguous map there
        if torch.compiler.is_compiling():
            x = x.contiguous()
        # in eager inference the map stays channels-last through the conv (layers/conv.py), so
        # the output is token-major and the permute below a view
        y = conv(x)
        return y.permute(0, 2, 3, 1).reshape(b, n, c)


@torch.library.custom_op("piip::dwconv_tokens", mutates_args=())
def _dwconv_tokens_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], h: int, w: int) -> Tensor:
    """A 3x3 depthwise conv (padding 1) of (B, H*W, C) tokens on their grid, back to tokens."""
    b, n, c = x.shape
    y = channels_last_conv(x.transpose(1, 2).reshape(b, c, h, w), weight, bias, 1, 1, 1, c)
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


@_dwconv_tokens_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], h: int, w: int) -> Tensor:
    return x.new_empty(x.shape)


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv on the token grid -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, hw: tuple[int, int], residual: Optional[Tensor] = None,
                scale: Optional[Tensor] = None) -> Tensor:
        """``residual + scale * ffn(x)`` when ``residual`` is given (one fused write-out where possible)."""
        x = self.drop(self.act(self.dwconv(apply_linear(self.fc1, x), hw)))
        return apply_output_linear(self.fc2, x, self.drop, residual, scale)
