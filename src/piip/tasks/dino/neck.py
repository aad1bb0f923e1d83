"""DINO's neck and positional encodings: ChannelMapper (1x1 conv + GroupNorm per input map, plus
stride-2 3x3 levels on the last input map) and the sine encodings of maps and of boxes."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ChannelMapper(nn.Module):
    """mmdet ``ChannelMapper(kernel_size=1, norm_cfg=GN(32), act_cfg=None, num_outs=len(in)+extra)``:
    lateral convs have no bias (a norm follows); each extra level is a 3x3 stride-2 conv + GN, the
    first on the last *input* map, the next ones on the previous extra output."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, extra_levels: int = 1,
                 groups: int = 32) -> None:
        super().__init__()
        groups = min(groups, out_channels)

        def conv_gn(c_in: int, k: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, out_channels, k, stride, k // 2, bias=False),
                                 nn.GroupNorm(groups, out_channels))

        self.convs = nn.ModuleList(conv_gn(c, 1, 1) for c in in_channels)
        self.extra_convs = nn.ModuleList(conv_gn(in_channels[-1] if i == 0 else out_channels, 3, 2)
                                         for i in range(extra_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        x = feats[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs


def sine_map_encoding(mask: Tensor, num_feats: int = 128, temperature: float = 20.0) -> Tensor:
    """mmdet ``SinePositionalEncoding(num_feats, normalize=True, temperature)`` of a padding mask
    (N, H, W; True = padded) -> (N, 2 * num_feats, H, W): y features then x features, each
    interleaving sin / cos, over cumulative valid-pixel counts normalised to (0, 2 pi]."""
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    n, h, w = mask.shape
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).view(n, h, w, -1)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).view(n, h, w, -1)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def sine_box_encoding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """(..., 4) normalised (cx, cy, w, h) -> (..., 4 * num_feats) as DINO's query positions:
    ``num_feats`` sin/cos features per coordinate, ordered y, x, w, h."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    parts = []
    for i in (1, 0, 2, 3):
        p = boxes[..., i, None].float() * scale / dim_t
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1).to(boxes.dtype)
