"""DINO's deformable transformer: a post-norm encoder of multi-scale deformable self-attention and
a decoder of (self-attention, deformable cross-attention to box references, FFN) layers with
iterative box refinement, all from :class:`piip.layers.deform_attn.MSDeformAttn`."""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ...layers.deform_attn import MSDeformAttn
from ...ops.ms_deform_attn import LevelShapes, level_layout
from .matcher import inverse_sigmoid
from .neck import sine_box_encoding


class FFN(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class MLP(nn.Sequential):
    """``layers`` linear layers with ReLU between (DINO's box and query-position heads)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, layers: int) -> None:
        dims = [dim_in] + [hidden] * (layers - 1) + [dim_out]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads, points, levels)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, ref: Tensor, shapes: LevelShapes, starts: tuple[int, ...],
                mask: Tensor) -> Tensor:
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, starts, mask))
        return self.norm2(src + self.ffn(src))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, heads, points, levels)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, pos: Tensor, ref: Tensor, memory: Tensor, shapes: LevelShapes, starts: tuple[int, ...],
                mask: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        q = tgt + pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + pos, ref, memory, shapes, starts, mask))
        return self.norm3(tgt + self.ffn(tgt))


def _float32(x: Tensor) -> torch.autocast:
    """Autocast switched off on ``x``'s device: what runs inside computes in float32."""
    return torch.autocast(x.device.type, enabled=False)


def encoder_reference_points(shapes: LevelShapes, valid_ratios: Tensor) -> Tensor:
    """(N, S, L, 2): every position's pixel centre, normalised by its level's valid size, then
    scaled to each level's valid ratio (Deformable-DETR)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        # pixel centres 0.5 .. size - 0.5 (= linspace's values; linspace fixes a symbolic size)
        dev = valid_ratios.device
        ry, rx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def encoder_proposals(memory: Tensor, mask: Tensor, shapes: LevelShapes) -> tuple[Tensor, Tensor]:
    """Per position a box logit (centre = pixel centre in the valid area, side 0.05 x 2^level) and
    the memory with padded / border positions zeroed; those positions' boxes are +inf (never picked)."""
    n = memory.shape[0]
    props, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
        gy, gx = torch.meshgrid(torch.arange(h, device=memory.device, dtype=memory.dtype),
                                torch.arange(w, device=memory.device, dtype=memory.dtype), indexing="ij")
        grid = torch.stack([gx, gy], -1)[None] + 0.5
        grid = grid / torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
        props.append(torch.cat([grid, wh], -1).view(n, -1, 4))
        start += h * w
    p = torch.cat(props, 1)
    keep = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
    logits = torch.log(p / (1 - p)).masked_fill(~keep, float("inf"))
    return logits, memory.masked_fill(~keep, 0.0)


class DeformableTransformer(nn.Module):
    """Encoder + two-stage query selection + decoder with look-forward-twice box refinement.

    The class / box heads (one per decoder layer, plus one for the encoder proposals) live here
    because the decoder refines its reference boxes with them."""

    def __init__(self, num_classes: int, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4,
                 ffn: int = 2048, enc_layers: int = 6, dec_layers: int = 6, num_queries: int = 900) -> None:
        super().__init__()
        self.dim, self.num_queries, self.levels = dim, num_queries, levels
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, levels, points, ffn) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, levels, points, ffn) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        self.query_embed = nn.Embedding(num_queries, dim)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        cls = nn.Linear(dim, num_classes)
        reg = MLP(dim, dim, 4, 3)
        # heads 0..dec_layers-1 for the decoder layers, the last one scores the encoder proposals
        self.cls_branches = nn.ModuleList(copy.deepcopy(cls) for _ in range(dec_layers + 1))
        self.reg_branches = nn.ModuleList(copy.deepcopy(reg) for _ in range(dec_layers + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        prior = -math.log((1 - 0.01) / 0.01)   # class prior 0.01
        for c, r in zip(self.cls_branches, self.reg_branches):
            nn.init.constant_(c.bias, prior)
            nn.init.zeros_(r[-1].weight)
            nn.init.zeros_(r[-1].bias)

    def forward(self, feats: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                dn: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> dict[str, Tensor]:
        """feats / pos (N, C, H, W) and masks (N, H, W) per level; ``dn`` = (content, box logits,
        attention mask) of denoising queries put before the matching ones. Returns per-layer
        ``logits`` (layers, N, T, C) and ``boxes`` (layers, N, T, 4) over all T queries and the
        selected encoder proposals ``enc_logits`` / ``enc_boxes``."""
        # level sizes as ints from the maps' sizes (symbolic under torch.export), never read from a tensor
        shapes, starts = level_layout([(f.shape[-2], f.shape[-1]) for f in feats])
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos_all = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos)], 1)
        # box geometry (valid ratios, reference points, proposals, box logits) stays float32 under autocast
        valid_ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                                    for m in masks], 1).float()               # (N, L, 2) as (x, y)
        ref = encoder_reference_points(shapes, valid_ratios)
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos_all, ref, shapes, starts, mask)

        # two-stage: the top-scoring encoder proposals become the decoder's initial boxes (positions);
        # the content queries are learned (mixed query selection)
        prop_logits, out_mem = encoder_proposals(memory.float(), mask, shapes)
        with _float32(out_mem):
            out_mem = self.enc_output_norm(self.enc_output(out_mem))
            enc_cls = self.cls_branches[-1](out_mem)
            enc_box = self.reg_branches[-1](out_mem) + prop_logits
        k = torch.sym_min(self.num_queries, enc_cls.shape[1])   # symbolic: no guard on the image size
        top = enc_cls.max(-1)[0].topk(k, dim=1)[1]
        top_box = torch.gather(enc_box, 1, top[..., None].expand(-1, -1, 4))
        enc_logits = torch.gather(enc_cls, 1, top[..., None].expand(-1, -1, enc_cls.shape[-1]))
        n = src.shape[0]
        tgt = self.query_embed.weight[None, :k].expand(n, -1, -1)
        anchors = top_box.detach()
        attn_mask = None
        if dn is not None:
            tgt = torch.cat([dn[0], tgt], 1)
            anchors = torch.cat([dn[1], anchors], 1)
            attn_mask = dn[2]
        out = self.decode(tgt, anchors.sigmoid(), memory, shapes, starts, mask, valid_ratios, attn_mask)
        out["enc_logits"], out["enc_boxes"] = enc_logits, top_box.sigmoid()
        return out

    def decode(self, tgt: Tensor, ref: Tensor, memory: Tensor, shapes: LevelShapes, starts: tuple[int, ...],
               mask: Tensor, valid_ratios: Tensor, attn_mask: Optional[Tensor]) -> dict[str, Tensor]:
        """Look forward twice: layer i samples around the detached boxes of layer i-1, while its
        predicted boxes refine layer i-1's undetached ones (so its loss also trains layer i-1's head)."""
        logits, boxes = [], []
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        prev = ref                                                            # undetached boxes of the last layer
        for i, layer in enumerate(self.decoder):
            ref_in = ref[:, :, None] * ratios4
            pos = self.ref_point_head(sine_box_encoding(ref_in[:, :, 0], self.dim // 2))
            tgt = layer(tgt, pos, ref_in, memory, shapes, starts, mask, attn_mask)
            with _float32(tgt):   # heads in float32 under autocast, as the released code runs them
                hs = self.decoder_norm(tgt.float())
                logits.append(self.cls_branches[i](hs))
                # ref is prev (layer 0) or prev.detach(): one inverse_sigmoid serves both. Two of the
                # same tensor make onnxscript's min/max-to-Clip rewrite name two constants
                # '<input>_min' and drop one ("Node input 'sigmoid_min_1' is not a graph input ...")
                inv_prev = inverse_sigmoid(prev)
                inv_ref = inv_prev if ref is prev else inv_prev.detach()
                boxes.append((self.reg_branches[i](hs) + inv_prev).sigmoid())
                prev = (self.reg_branches[i](tgt.float()) + inv_ref).sigmoid()
            ref = prev.detach()
        return {"logits": torch.stack(logits), "boxes": torch.stack(boxes)}
