"""Parameter and FLOP counts of PIIP models under the papers' convention, in seconds, on any laptop.

Why analytic: the papers compare accuracy per FLOP, so our counts must be *their* counts, and a
full-resolution forward of a 500M-parameter backbone is too slow and memory-hungry for that.
The model is instantiated on the ``meta`` device (no memory, no weights) and its module tree is
walked with each branch's token grid; the counting rules below are applied to every leaf module.
The built model is the one source of truth: widths, heads, deform ratio, CFFN ratio, windows,
interaction edges and groups all come from its modules.

Counting rules (those of the official counter, mmcv's ``get_model_complexity_info`` plus the
analytic attention terms of the official ``get_flops_det.py``):

* one multiply-accumulate (MAC) = one FLOP;
* ``nn.Linear``: tokens x in x out (the bias add is not counted);
* ``nn.Conv2d``: output positions x k² x in/groups x out, plus out x positions for a bias;
  ``nn.ConvTranspose2d``: input positions x k² x in x out/groups, plus the bias adds;
* ``nn.LayerNorm`` / ``nn.GroupNorm``: 2 x elements (1 x without affine); ``nn.ReLU`` and
  ``nn.MaxPool2d``: 1 x elements; GELU, softmax, residual adds, resizing (input pyramid, position
  tables, merge upsampling) and pooling by ``mean`` are not counted;
* self-attention products: 2·N·M·d for N queries over M keys of total width d
  (global: M = N, class token included; windowed: M = window², on the unpadded N tokens in the
  paper convention; as built, on the zero-padded grid the windows really cover, the qkv
  projection included);
* deformable cross-attention sampling: 5·N·K·d with N query tokens, K = points x levels (4) and d the
  query width; its linear layers are counted as Linears (value_proj on the feature tokens);
  regular cross-attention (ablation): 2·Nq·Nk·d.

Paper convention (``params``/``flops``): the backbone (branches, interactions, branch
merging; no pyramid adapters, FPN or detection heads) plus a classification head: an ImageNet
classifier's own norm + linear heads, and for every other model the 1000-class LayerNorm + Linear
head on the widest width that the papers' counter (the classification code's ``get_flops.py``)
attaches to every model it counts (0.77M for a 768-wide model), except the regular-FPN models
of Table II (the ``regular_fpn`` hybrids and the ConvNeXt-B baseline), whose rows come from the
detection counter (no head). Position embeddings are
counted at each branch's input grid (e.g. 70x70x192 for a 1120 px ViT-T) and the merging as the
light ``linear`` merging (LayerNorm + Linear + LayerNorm per branch narrower than the output,
LayerNorm only otherwise) whatever merging the model is built with, except for ``gn_linear``
(PIIP-B classification, counted as built) and ``regular_fpn`` models (the ConvNeXt/ViT hybrids),
whose Table II counts their real single-conv merges: the final one and those after each of
``out_groups``. Branches whose grid changes from group to group (ConvNeXt) are counted module by
module on the grid each module reads (``view // stride``, as the floor-rounding convolutions
produce); their LayerNorms are counted (the official counter misses Hugging Face's
``ConvNextLayerNorm``, a 0.1-0.3G difference at 1024 px). *As built*
(``built_params``/``built_flops``): everything the instantiated model holds and runs, i.e. its
stored position tables, its real merging (``conv`` for the detection models), the simple feature
pyramid (the levels it returns) and the classification heads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .branches.base import Branch, FlopPart
from .config import PIIPConfig
from .layers.attention import Attention, CrossAttention
from .layers.deform_attn import MSDeformAttn
from .layers.interaction import InteractionEdge
from .layers.merge import BranchMerge
from .ops.symbolic import pair

KINDS = ("linear", "conv", "attention", "deform", "norm", "act", "pool")

__all__ = ["KINDS", "ModuleCost", "Complexity", "count_model", "count_config", "module_flops",
           "attention_flops", "deform_attention_flops", "branch_grids", "count"]


# ---------------------------------------------------------------------------- result types
@dataclass
class ModuleCost:
    """Parameters and FLOPs of one part of a model, FLOPs split by kind (see :data:`KINDS`)."""

    module: str
    params: int = 0
    flops_by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})

    @property
    def flops(self) -> int:
        return sum(self.flops_by_kind.values())

    def add(self, kind: str, n: int) -> None:
        self.flops_by_kind[kind] += int(n)

    def merge_from(self, other: "ModuleCost") -> None:
        self.params += other.params
        for k, v in other.flops_by_kind.items():
            self.flops_by_kind[k] += v

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "params": self.params, "flops": self.flops,
                "flops_by_kind": dict(self.flops_by_kind)}


@dataclass
class Complexity:
    """Counts of one model: paper convention (``params``, ``flops``) and as built."""

    model: str
    resolutions: list[float]
    grids: list[tuple[int, int]]
    breakdown: list[ModuleCost]
    built_breakdown: list[ModuleCost]
    merge_built: Optional[str]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.breakdown)

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.breakdown)

    @property
    def built_params(self) -> int:
        return sum(c.params for c in self.built_breakdown)

    @property
    def built_flops(self) -> int:
        return sum(c.flops for c in self.built_breakdown)

    def part(self, prefix: str, built: bool = False) -> ModuleCost:
        """Sum of the breakdown rows whose name starts with ``prefix`` (e.g. 'branch 0', 'interactions')."""
        rows = [c for c in (self.built_breakdown if built else self.breakdown) if c.module.startswith(prefix)]
        if not rows:
            raise ValueError(f"no breakdown row starts with {prefix!r}; rows: {[c.module for c in self.breakdown]}")
        out = ModuleCost(prefix)
        for r in rows:
            out.merge_from(r)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "resolution": [round(r, 2) for r in self.resolutions],
            "grids": [list(g) for g in self.grids],
            "params": self.params,
            "flops": self.flops,
            "breakdown": [c.to_dict() for c in self.breakdown],
            "as_built": {"params": self.built_params, "flops": self.built_flops, "merge": self.merge_built,
                         "breakdown": [c.to_dict() for c in self.built_breakdown]},
            "convention": "backbone only, 1 MAC = 1 FLOP, position embeddings at each branch's input grid, "
                          "linear branch merging (see piip.complexity)",
        }


# ---------------------------------------------------------------------------- counting rules
@dataclass(frozen=True)
class Geom:
    """What a module reads: ``tokens`` rows for Linear/LayerNorm, an ``hw`` map for convolutions."""

    tokens: int
    hw: tuple[int, int]


def attention_flops(n: int, d: int, window: int = 0) -> int:
    """QK^T and attn·V products of self-attention: 2·N·M·d, M = N (global) or window² (windowed)."""
    m = window * window if window > 0 else n
    return 2 * n * m * d


def deform_attention_flops(n_query: int, d: int, points: int = 4) -> int:
    """Deformable attention sampling and weighting, as the official counter: 5·N·K·d."""
    return 5 * n_query * points * d


def _conv_out(hw: tuple[int, int], m: Union[nn.Conv2d, nn.MaxPool2d]) -> tuple[int, int]:
    k, s, p = (pair(getattr(m, a)) for a in ("kernel_size", "stride", "padding"))
    d = pair(getattr(m, "dilation", 1))
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))  # type: ignore[return-value]


def _out_hw(m: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after ``m`` (for propagating a map through an nn.Sequential)."""
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
        return _conv_out(hw, m)
    if isinstance(m, nn.ConvTranspose2d):
        k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
        op = pair(m.output_padding)
        return tuple((hw[i] - 1) * s[i] - 2 * p[i] + k[i] + op[i] for i in range(2))  # type: ignore[return-value]
    return hw


def module_flops(m: nn.Module, geom: Geom, width: Optional[int] = None) -> Optional[tuple[str, int]]:
    """FLOPs of one leaf module reading ``geom`` (None for modules that are not counted).

    ``width`` is the channel count of the map for element-wise modules that do not know their own
    (ReLU, max-pool)."""
    if isinstance(m, nn.Linear):
        return "linear", geom.tokens * m.in_features * m.out_features
    if isinstance(m, nn.Conv2d):
        oh, ow = _conv_out(geom.hw, m)
        kh, kw = pair(m.kernel_size)
        pos = oh * ow
        macs = pos * kh * kw * (m.in_channels // m.groups) * m.out_channels
        return "conv", macs + (m.out_channels * pos if m.bias is not None else 0)
    if isinstance(m, nn.ConvTranspose2d):
        kh, kw = pair(m.kernel_size)
        oh, ow = _out_hw(m, geom.hw)
        macs = geom.hw[0] * geom.hw[1] * kh * kw * m.in_channels * (m.out_channels // m.groups)
        return "conv", macs + (m.out_channels * oh * ow if m.bias is not None else 0)
    if isinstance(m, nn.LayerNorm):
        c = math.prod(m.normalized_shape)
        return "norm", geom.tokens * c * (2 if m.elementwise_affine else 1)
    if isinstance(m, nn.GroupNorm):
        return "norm", geom.hw[0] * geom.hw[1] * m.num_channels * (2 if m.affine else 1)
    if isinstance(m, (nn.ReLU, nn.MaxPool2d)):
        if width is None:
            raise ValueError(f"counting {type(m).__name__} needs the channel width of its input")
        return ("act" if isinstance(m, nn.ReLU) else "pool"), geom.hw[0] * geom.hw[1] * width
    return None


def _walk(root: nn.Module, geom: Geom, cost: ModuleCost, overrides: Optional[dict[int, Geom]] = None,
          width: Optional[int] = None, padded: bool = False, exact_norms: bool = False) -> None:
    """Add the FLOPs of every module under ``root`` to ``cost``.

    ``overrides`` maps ``id(module)`` to the geometry that module (and its children) read, e.g. the
    feature branch's tokens for an interaction's projection. ``width`` is the channel count
    used for element-wise modules (ReLU, pooling) that do not know their own width. ``padded``
    counts windowed attention on the zero-padded grid it really runs on (as built) instead of the
    papers' unpadded N·window². ``exact_norms`` counts only exact ``nn.LayerNorm`` norms, as the
    PIIP-LLaVA counter's hook does (timm's ConvNeXt norms subclass it and are missed).
    """
    overrides = overrides or {}
    geom = overrides.get(id(root), geom)
    if isinstance(root, nn.Sequential) and not any(id(c) in overrides for c in root):
        _walk_map_sequential(root, geom.hw, cost, exact_norms=exact_norms)
        return
    res = _counted(root, module_flops(root, geom, width), exact_norms)
    if res is not None:
        cost.add(*res)
    if isinstance(root, Attention):
        n, ws = geom.tokens, root.window_size
        if padded and ws > 0:  # qkv and the products run on the padded windows, proj on the real tokens
            n = -(-geom.hw[0] // ws) * ws * (-(-geom.hw[1] // ws)) * ws
            overrides = {**overrides, id(root.qkv): Geom(n, geom.hw)}
        cost.add("attention", attention_flops(n, root.num_heads * root.head_dim, ws))
    elif isinstance(root, MSDeformAttn):
        cost.add("deform", deform_attention_flops(geom.tokens, root.dim, root.num_points * root.num_levels))
    for child in root.children():
        _walk(child, geom, cost, overrides, width, padded, exact_norms)


def _counted(m: nn.Module, res: Optional[tuple[str, int]], exact_norms: bool) -> Optional[tuple[str, int]]:
    return None if exact_norms and res is not None and res[0] == "norm" and type(m) is not nn.LayerNorm else res


def _walk_map_sequential(seq: nn.Sequential, hw: tuple[int, int], cost: ModuleCost,
                         width: Optional[int] = None, exact_norms: bool = False) -> None:
    """Count an nn.Sequential of map layers, propagating the spatial size (and channel width, for
    element-wise layers) from layer to layer; ``width`` is the input's channel count if known."""
    for m in seq:
        if isinstance(m, nn.Sequential):
            _walk_map_sequential(m, hw, cost, width, exact_norms)
            hw = _seq_out_hw(m, hw)
            continue
        res = _counted(m, module_flops(m, Geom(hw[0] * hw[1], hw), width), exact_norms)
        if res is not None:
            cost.add(*res)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            width = m.out_channels
        elif isinstance(m, nn.GroupNorm):
            width = m.num_channels
        hw = _out_hw(m, hw)


def _seq_out_hw(seq: nn.Sequential, hw: tuple[int, int]) -> tuple[int, int]:
    for m in seq:
        hw = _seq_out_hw(m, hw) if isinstance(m, nn.Sequential) else _out_hw(m, hw)
    return hw


def _n_params(*mods: Optional[nn.Module]) -> int:
    return sum(p.numel() for m in mods if m is not None for p in m.parameters())


# ---------------------------------------------------------------------------- model parts
def branch_grids(cfg: PIIPConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Each branch's input view (H, W) and its last token grid for a square input at the finest
    resolution, computed as the model does (bilinear resize by the resolution ratio, floor, then
    every stride-s reduction floors: grid = view // s)."""
    base = cfg.branches[0].img_size
    size = int(round(base))
    p0 = cfg.branches[0].max_stride
    if size % p0:
        raise ValueError(f"img_size={base:g} is not a multiple of the finest branch's input stride {p0} "
                         f"(e.g. {max(p0, size // p0 * p0)} or {size // p0 * p0 + p0})")
    views, grids = [], []
    for b in cfg.branches:
        s = b.img_size / base
        v = size if s >= 1 else int(math.floor(size * s))
        if v < b.max_stride:
            raise ValueError(f"img_size={base:g} gives a branch a {v} px view, smaller than its input stride "
                             f"({b.max_stride} px); use a larger img_size")
        views.append((v, v))
        grids.append((v // b.max_stride, v // b.max_stride))
    return views, grids


def _group_grids(br: nn.Module, view: tuple[int, int]) -> list[tuple[int, int]]:
    """The branch's token grid after each interaction group (its real grid, from the group's stride)."""
    return [(view[0] // s, view[1] // s) for s in br.group_strides]


def _branch_cost(br: Branch, label: str, view: tuple[int, int], paper: bool) -> ModuleCost:
    """A branch's own count: each module it runs (``Branch.flop_parts``) on what it reads."""
    cost = ModuleCost(label, params=br.params_at(view) if paper else _n_params(br))
    for part in br.flop_parts(view):
        _walk(part.module, Geom(part.tokens, part.hw), cost, _part_reads(part), padded=not paper)
    return cost


def _part_reads(part: FlopPart) -> dict[int, Geom]:
    return {k: Geom(*v) for k, v in (part.reads or {}).items()}


def _edge_cost(edge: InteractionEdge, q: Geom, f: Geom, cost: ModuleCost) -> None:
    """One directed interaction: projection and feature norm / value projection read the feature
    branch, everything else the query branch."""
    inj = edge.injector
    over = {id(edge.proj): f, id(inj.feat_norm): f}
    attn = inj.attn
    if isinstance(attn, MSDeformAttn):
        over[id(attn.value_proj)] = f
    elif isinstance(attn, CrossAttention):
        over[id(attn.wk)] = f
        over[id(attn.wv)] = f
        cost.add("attention", 2 * q.tokens * f.tokens * attn.wq.out_features)
    else:  # pragma: no cover - Injector only builds these two
        raise ValueError(f"unknown interaction attention {type(attn).__name__}")
    _walk(edge, q, cost, over)


def _interaction_cost(backbone: nn.Module, grids: Sequence[Sequence[tuple[int, int]]]) -> ModuleCost:
    """``grids[k][g]``: branch k's token grid at group g."""
    cost = ModuleCost("interactions", params=_n_params(backbone.interactions))
    if backbone.interactions is None:
        return cost
    for g, group in enumerate(backbone.interactions):
        geoms = [Geom(gr[g][0] * gr[g][1], gr[g]) for gr in grids]
        for key, edge in group.edges.items():
            s, d = (int(i) for i in key.split("to"))
            _edge_cost(edge, geoms[d], geoms[s], cost)
    return cost


def _merge_cost(merge: Optional[BranchMerge], grids: Sequence[tuple[int, int]], label: str) -> Optional[ModuleCost]:
    if merge is None:
        return None
    cost = ModuleCost(label, params=_n_params(merge))
    for proj, (h, w) in zip(merge.projs, grids):
        _walk(proj, Geom(h * w, (h, w)), cost)
    return cost


def _merges_cost(backbone: nn.Module, grids: Sequence[Sequence[tuple[int, int]]],
                 paper: bool) -> list[ModuleCost]:
    """The final merge and the intermediate ones of regular-FPN models, each on every branch's grid
    at its group. The papers count the light ``linear`` merge for the simple-pyramid models (the
    ``gn_linear`` merge of PIIP-B classification as built), but the real merges of the regular-FPN
    hybrids (Table II)."""
    last = backbone.num_groups - 1
    merge = backbone.merge
    if merge is None:
        return []
    if paper and merge.kind not in ("regular_fpn", "gn_linear"):
        with torch.device("meta"):
            light = BranchMerge([br.out_dim for br in backbone.branches], backbone.embed_dim, "linear")
        return [_merge_cost(light, [gr[last] for gr in grids], "merging (linear)")]
    rows = [_merge_cost(merge, [gr[last] for gr in grids], f"merging ({merge.kind})")]
    for g, m in (backbone.inter_merges or {}).items():
        rows.append(_merge_cost(m, [gr[int(g)] for gr in grids], f"merging ({merge.kind}) after group {g}"))
    return [r for r in rows if r is not None]


def _pyramid_cost(pyramid: Optional[nn.Module], grids: Sequence[tuple[int, int]],
                  widths: Sequence[int]) -> Optional[ModuleCost]:
    """Level i reads a map on ``grids[i]`` with ``widths[i]`` channels."""
    if pyramid is None:
        return None
    cost = ModuleCost("pyramid (fpn1-4)", params=_n_params(pyramid))
    for level in pyramid.levels:  # the maps it returns (DINO: fpn2-4; fpn1's weights are held, not run)
        m = getattr(pyramid, f"fpn{level + 1}")
        grid, width = grids[level], widths[level]
        seq = m if isinstance(m, nn.Sequential) else nn.Sequential(m)
        _walk_map_sequential(seq, grid, cost, width=width)
    return cost


def _heads_cost(model: nn.Module, grid: tuple[int, int]) -> Optional[ModuleCost]:
    heads = getattr(model, "heads", None)
    if heads is None:
        return None
    cost = ModuleCost("classification heads", params=_n_params(heads))
    merged = model.cfg.head == "merged"
    for head in heads:  # one token per head; the merged head norms every token of the finest grid first
        _walk(head.norm, Geom(grid[0] * grid[1] if merged else 1, grid), cost)
        _walk(head.fc, Geom(1, (1, 1)), cost)
    return cost


# The papers' counter (classification get_flops.py) adds a 1000-class head on the widest width to
# every model it counts, detection backbones included (vision_spec §0.4, §F.4).
PAPER_HEAD_CLASSES = 1000


def _paper_head_cost(width: int, grid: tuple[int, int]) -> ModuleCost:
    """cls_norm LayerNorm over the finest grid's tokens + a Linear(width, 1000) on the pooled vector."""
    with torch.device("meta"):
        norm, fc = nn.LayerNorm(width), nn.Linear(width, PAPER_HEAD_CLASSES)
    cost = ModuleCost("classification head (paper counter)", params=_n_params(norm, fc))
    _walk(norm, Geom(grid[0] * grid[1], grid), cost)
    _walk(fc, Geom(1, (1, 1)), cost)
    return cost


def _regular_fpn(backbone: nn.Module) -> bool:
    """Table II models: the regular-FPN hybrids and the ConvNeXt baseline (stage maps, no merge)."""
    return bool(backbone.out_groups) or (backbone.merge is not None and backbone.merge.kind == "regular_fpn")


def _describe_branch(i: int, br: nn.Module, res: float) -> str:
    return f"branch {i} ({br.label or br.cfg.kind} {br.cfg.embed_dim}d x{br.cfg.depth} @ {round(res, 1):g})"


# ---------------------------------------------------------------------------- entry points
def count_model(model: nn.Module, name: str = "model") -> Complexity:
    """Count an already built :class:`PIIPBackbone` or :class:`PIIPClassifier` (any device)."""
    backbone = getattr(model, "backbone", model)
    cfg: PIIPConfig = backbone.cfg
    if cfg.task == "features":  # vision towers of PIIP-LLaVA: that paper's counter
        return _count_llava_tower(backbone, name)
    views, grids = branch_grids(cfg)
    group_grids = [_group_grids(br, v) for br, v in zip(backbone.branches, views)]
    res = [b.img_size for b in cfg.branches]
    paper: list[ModuleCost] = []
    built: list[ModuleCost] = []
    for i, (br, v) in enumerate(zip(backbone.branches, views)):
        label = _describe_branch(i, br, res[i])
        paper.append(_branch_cost(br, label, v, paper=True))
        built.append(_branch_cost(br, label, v, paper=False))
    if backbone.interactions is not None:
        inter = _interaction_cost(backbone, group_grids)
        paper.append(inter)
        built.append(dataclasses.replace(inter, flops_by_kind=dict(inter.flops_by_kind)))
    paper += _merges_cost(backbone, group_grids, paper=True)
    built += _merges_cost(backbone, group_grids, paper=False)
    taps = backbone.out_groups or [backbone.num_groups - 1] * 4
    levels = taps + [backbone.num_groups - 1] if backbone.out_groups else taps
    pyramid = _pyramid_cost(backbone.pyramid, [group_grids[0][g] for g in levels], backbone.out_channels)
    if pyramid is not None:
        built.append(pyramid)
    heads = _heads_cost(model, grids[0])
    if heads is not None:  # an ImageNet classifier's reported size includes its heads
        paper.append(heads)
        built.append(dataclasses.replace(heads, flops_by_kind=dict(heads.flops_by_kind)))
    elif not _regular_fpn(backbone):
        # the Table II (regular-FPN) rows come from the detection counter, which adds no head
        paper.append(_paper_head_cost(backbone.embed_dim, grids[0]))
    return Complexity(model=name, resolutions=res, grids=list(grids), breakdown=paper, built_breakdown=built,
                      merge_built=backbone.merge.kind if backbone.merge is not None else None)


def count_config(cfg: PIIPConfig, name: str = "model") -> Complexity:
    """Build ``cfg`` on the meta device (no memory, no weights) and count it."""
    from .registry import build_on_meta
    branch_grids(cfg)  # validate the resolution before building
    return count_model(build_on_meta(cfg), name)


def count(name: str, img_size: Optional[Sequence[float]] = None, **overrides: Any) -> Complexity:
    """Count a registered model; ``img_size`` is one finest-branch size or one size per branch."""
    from .registry import get_config
    cfg = get_config(name, **overrides)
    if img_size:
        sizes = [float(s) for s in img_size]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"img_size values must be positive, got {list(img_size)}")
        if len(sizes) == 1:
            cfg = cfg.replace(img_size=sizes[0])
        elif len(sizes) == len(cfg.branches):
            cfg = cfg.replace(branches=[{"img_size": s} for s in sizes])
        else:
            raise ValueError(f"img_size takes 1 value or one per branch ({len(cfg.branches)} for {name}), "
                             f"got {len(sizes)}")
    return count_config(cfg, name)


# ---------------------------------------------------------------------------- PIIP-LLaVA towers
def _count_llava_tower(backbone: nn.Module, name: str) -> Complexity:
    """The PIIP-LLaVA counter (llava_spec §6.1, ``get_flops_llava.py``): the vision tower alone, no head;
    self-attention products on the patch tokens only (class token excluded, though the Linears read it);
    timm's ConvNeXt norms are not counted (the official hook matches exact ``nn.LayerNorm``); the
    deformable term of every interaction uses the fine branch's grid after its *first* group."""
    cfg: PIIPConfig = backbone.cfg
    views, grids = branch_grids(cfg)
    group_grids = [_group_grids(br, v) for br, v in zip(backbone.branches, views)]
    rows: list[ModuleCost] = []
    for i, (br, v) in enumerate(zip(backbone.branches, views)):
        cost = ModuleCost(_describe_branch(i, br, cfg.branches[i].img_size), params=_n_params(br))
        for part in br.flop_parts(v, patch_attention=True):
            _walk(part.module, Geom(part.tokens, part.hw), cost, _part_reads(part), exact_norms=True)
        rows.append(cost)
    if backbone.interactions is not None:
        inter = _interaction_cost(backbone, group_grids)
        first = _interaction_cost(backbone, [[gr[0]] * len(gr) for gr in group_grids])
        inter.flops_by_kind["deform"] = first.flops_by_kind["deform"]
        rows.append(inter)
    return Complexity(model=name, resolutions=[b.img_size for b in cfg.branches], grids=list(grids), breakdown=rows,
                      built_breakdown=[dataclasses.replace(r, flops_by_kind=dict(r.flops_by_kind)) for r in rows],
                      merge_built=None)
