"""Interaction units: deformable (or regular) cross-attention + ConvFFN between two branches.

An *edge* ``src -> dst`` lets branch ``dst`` (the query) read branch ``src`` (the features).
An :class:`InteractionGroup` holds the edges run after one group of blocks; bidirectional
adjacent edges are the paper's default, any directed set expresses the direction ablations.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import CrossAttention
from .deform_attn import MSDeformAttn
from .drop import DropPath, inactive
from .fold import folded_path
from .linear import apply_linear, unhooked
from .mlp import ConvFFN


def deform_inputs(query_hw: tuple[int, int], feat_hw: tuple[int, int],
                  device: torch.device) -> tuple[Tensor, tuple[tuple[int, int]], tuple[int]]:
    """Reference points at the query tokens' centres (normalised to [0, 1]) and the one-level
    shape / start index of the feature map, as ints.

    Rebuilt on every call from the (possibly symbolic) sizes, never cached by size: a trace then
    computes the points from its input's sizes (an arange of H*W elements costs next to nothing
    beside the attention)."""
    h, w = query_hw
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, h * w, 1, 2)
    return ref, (tuple(feat_hw),), (0,)


class Injector(nn.Module):
    """query += ca_gamma * CrossAttn(norm(query), norm(feat)); query += cffn_gamma * ConvFFN(...)."""

    def __init__(self, dim: int, dim_feat: int, attn_type: str = "deform", num_heads: int = 6,
                 num_points: int = 4, deform_ratio: float = 1.0, with_cffn: bool = True,
                 cffn_ratio: float = 0.25, drop_path: float = 0.0, norm: bool = True) -> None:
        super().__init__()
        self.attn_type = attn_type
        # norm=False: the released "_speedup" configs' norm_layer='none' (identity, no weights)
        norm_layer = (lambda d: nn.LayerNorm(d, eps=1e-6)) if norm else (lambda d: nn.Identity())
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim_feat)
        if attn_type == "deform":
            self.attn: nn.Module = MSDeformAttn(dim, num_heads, num_points, 1, deform_ratio, dim_feat)
        elif attn_type == "normal":
            self.attn = CrossAttention(dim, num_heads, dim_feat)
        else:
            raise ValueError(f"interaction attn_type must be 'deform' or 'normal', got {attn_type!r}")
        self.ca_gamma = nn.Parameter(torch.zeros(dim))
        self.with_cffn = with_cffn
        if with_cffn:
            self.cffn_gamma = nn.Parameter(torch.zeros(dim))
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: Tensor, query_hw: tuple[int, int], feat: Tensor, feat_hw: tuple[int, int],
                value: Optional[Tensor] = None) -> Tensor:
        """``value``: the attention's values already computed from ``feat`` (the edge's fold), which
        ``feat`` (then None) and ``feat_norm`` are skipped for."""
        q = self.query_norm(query)
        f = self.feat_norm(feat) if value is None else None
        if self.attn_type == "deform":
            ref, shapes, start = deform_inputs(query_hw, feat_hw, query.device)
            if unhooked(self.attn, MSDeformAttn):   # gated residual added as output_proj writes out
                query = self.attn(q, ref, f, shapes, start, residual=query, scale=self.ca_gamma, value=value)
            else:
                query = query + self.ca_gamma * self.attn(q, ref, f, shapes, start)
        else:
            query = query + self.ca_gamma * self.attn(q, f)
        if not self.with_cffn:
            return query
        if unhooked(self.ffn, ConvFFN) and inactive(self.drop_path):
            return self.ffn(self.ffn_norm(query), query_hw, residual=query, scale=self.cffn_gamma)
        return query + self.cffn_gamma * self.drop_path(self.ffn(self.ffn_norm(query), query_hw))


class InteractionEdge(nn.Module):
    """Feature branch ``src`` projected to the query branch's width, then injected into it."""

    def __init__(self, src_dim: int, dst_dim: int, with_proj: bool = True, **injector_kwargs) -> None:
        super().__init__()
        self.proj = nn.Linear(src_dim, dst_dim) if with_proj else nn.Identity()
        self.injector = Injector(dst_dim, dst_dim if with_proj else src_dim, **injector_kwargs)

    def forward(self, query: Tensor, query_hw: tuple[int, int], feat: Tensor, feat_hw: tuple[int, int]) -> Tensor:
        inj = self.injector
        if inj.attn_type == "deform" and unhooked(inj, Injector) and unhooked(inj.attn, MSDeformAttn):
            # proj -> feat_norm -> value_proj in fewer multiply-adds where nobody can tell (layers/fold.py)
            value = folded_path(self.proj, inj.feat_norm, inj.attn.value_proj, feat)
            if value is not None:
                return inj(query, query_hw, None, feat_hw, value=value)
        return inj(query, query_hw, apply_linear(self.proj, feat), feat_hw)


def default_edges(num_branches: int) -> list[tuple[int, int]]:
    """Bidirectional connections between adjacent branches: (i+1 -> i) and (i -> i+1)."""
    edges = []
    for i in range(num_branches - 1):
        edges += [(i + 1, i), (i, i + 1)]
    return edges


def validate_edges(edges: Sequence[Sequence[int]], num_branches: int) -> list[tuple[int, int]]:
    out = []
    for e in edges:
        if len(e) != 2 or not all(isinstance(i, int) and 0 <= i < num_branches for i in e) or e[0] == e[1]:
            raise ValueError(f"interaction edge {tuple(e)!r} is invalid: expected (src, dst) branch indices "
                             f"in [0, {num_branches - 1}] with src != dst")
        out.append((int(e[0]), int(e[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"interaction edges contain duplicates: {out}")
    return out


class InteractionGroup(nn.Module):
    """All edges run after one group of blocks.

    Edges are processed pair by pair, finest pair first (the released code's order). Inside a
    pair both directions read the states from before that pair was updated.
    """

    def __init__(self, dims: Sequence[int], edges: Sequence[tuple[int, int]], **edge_kwargs) -> None:
        super().__init__()
        self.edges = nn.ModuleDict({f"{s}to{d}": InteractionEdge(dims[s], dims[d], **edge_kwargs) for s, d in edges})
        pairs = sorted({(min(s, d), max(s, d)) for s, d in edges})
        # coarse query first, as the released code does (its order does not change the result)
        self.schedule = [[(s, d) for s, d in sorted(edges, key=lambda e: -e[1]) if {s, d} == set(p)] for p in pairs]

    def forward(self, xs: list[Tensor], hws: Sequence[tuple[int, int]]) -> list[Tensor]:
        xs = list(xs)
        for pair in self.schedule:
            before = {i: xs[i] for e in pair for i in e}
            for s, d in pair:
                xs[d] = self.edges[f"{s}to{d}"](before[d], hws[d], before[s], hws[s])
        return xs
