"""PIIPBackbone: N branches + interactions + branch merging + simple feature pyramid.

One implementation for any number of branches and every task; a single-branch config is a
plain ViT / ViTDet backbone.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.init import trunc_normal_
from torch import Tensor, nn

from .branches import Branch, Tokens, build_branch
from .config import PIIPConfig
from .layers.deform_attn import MSDeformAttn
from .layers.interaction import InteractionGroup, default_edges, validate_edges
from .layers.merge import BranchMerge
from .layers.pyramid import LEVEL_STRIDES, SimpleFeaturePyramid


TRACE_REFUSAL = ("PIIP models cannot be traced by torch.jit.trace or the TorchScript-based torch.onnx.export "
                 "(dynamo=False): the traced graph would hold one input size's branch sizes and be wrong at "
                 "others; use torch.export.export, torch.onnx.export(..., dynamo=True) or `piip export`")


class PIIPBackbone(nn.Module):
    """Parameter-inverted image pyramid backbone.

    Input: one batch (B, 3, H, W) at the finest branch's resolution; every other branch gets it
    resized (bilinear) by the ratio of registered resolutions. ``forward`` returns an
    OrderedDict of 4 NCHW maps at strides 4, 8, 16, 32 (keys '0'..'3'); ``forward_features``
    the merged map before the pyramid.
    """

    def __init__(self, cfg: PIIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = len(cfg.branches)
        if n < 1:
            raise ValueError("a PIIP model needs at least one branch")
        self.branches = nn.ModuleList(build_branch(b, name=f"branch {i} ({_describe(b)})")
                                      for i, b in enumerate(cfg.branches))
        base = cfg.branches[0].img_size
        self.scales = [b.img_size / base for b in cfg.branches]
        num_groups = {br.num_groups for br in self.branches}
        if len(num_groups) != 1:
            raise ValueError(f"all branches need the same number of interaction groups, got "
                             f"{[br.num_groups for br in self.branches]}")
        self.num_groups = num_groups.pop()
        self.edges = validate_edges(cfg.edges, n) if cfg.edges is not None else default_edges(n)
        if n > 1 and self.edges:
            self.interactions = nn.ModuleList(
                InteractionGroup([br.group_dims[g] for br in self.branches], self.edges,
                                 with_proj=cfg.interaction_proj, norm=cfg.interaction_norm,
                                 attn_type=cfg.attn_type,
                                 num_heads=cfg.deform_num_heads, num_points=cfg.n_points,
                                 deform_ratio=cfg.deform_ratio, with_cffn=cfg.with_cffn,
                                 cffn_ratio=cfg.cffn_ratio, drop_path=cfg.interaction_drop_path)
                for g in range(self.num_groups))
        else:
            self.interactions = None
        self.out_groups = self._check_out_groups(cfg.out_groups)
        if cfg.merge == "regular_fpn":  # every output is at the last (largest) branch's width
            widths = [self.branches[-1].group_dims[g] for g in self.out_groups + [self.num_groups - 1]]
        else:
            widths = [max(br.group_dims[g] for br in self.branches) for g in self.out_groups + [self.num_groups - 1]]
        self.embed_dim = widths[-1]
        if cfg.merge is not None and (n > 1 or cfg.merge in ("linear", "gn_linear")):
            self.merge: Optional[BranchMerge] = self._build_merge(self.num_groups - 1, widths[-1])
            # official names: intermediate_merging_{g}_*
            self.inter_merges = nn.ModuleDict({str(g): self._build_merge(g, w)
                                               for g, w in zip(self.out_groups, widths)}) if self.out_groups else None
        else:
            if n > 1 and cfg.task not in ("classification", "features"):
                raise ValueError("a multi-branch dense model needs merge='conv', 'linear', 'gn_linear' or "
                                 "'regular_fpn'")
            self.merge, self.inter_merges = None, None
        # merged maps sit on the finest branch's grid at their group
        strides = [self.branches[0].group_strides[g] for g in self.out_groups + [self.num_groups - 1]]
        if self.out_groups:
            if not cfg.pyramid:
                raise ValueError("out_groups feed the pyramid: set pyramid='gn' or 'ln'")
            self.pyramid = SimpleFeaturePyramid(widths, cfg.pyramid, strides, cfg.pyramid_levels)
        else:
            self.pyramid = (SimpleFeaturePyramid(self.embed_dim, cfg.pyramid, [strides[-1]] * 4, cfg.pyramid_levels)
                            if cfg.pyramid else None)
        # per pyramid level, indexed by level number even when pyramid_levels returns fewer maps
        # (or the single merged map without a pyramid)
        self.out_channels: list[int] = (list(widths) if self.out_groups else [self.embed_dim] * 4) \
            if self.pyramid is not None else [self.embed_dim]
        self.out_strides: list[int] = list(LEVEL_STRIDES) if self.pyramid is not None else [strides[-1]]
        self._init_new_modules()

    def _check_out_groups(self, out_groups: Optional[list[int]]) -> list[int]:
        if not out_groups:
            return []
        last = self.num_groups - 1
        if sorted(set(out_groups)) != list(out_groups) or not all(0 <= g < last for g in out_groups) \
                or len(out_groups) != 3:
            raise ValueError(f"out_groups {out_groups} must be 3 increasing interaction groups before the last "
                             f"one ({last}); with the final map they make the 4 pyramid levels")
        return list(out_groups)

    def _build_merge(self, group: int, width: int) -> BranchMerge:
        return BranchMerge([br.group_dims[group] for br in self.branches], width, self.cfg.merge)

    # ------------------------------------------------------------------ init
    def _init_new_modules(self) -> None:
        for mod in (self.interactions, self.merge, self.inter_merges, self.pyramid):
            if mod is not None:
                mod.apply(_init_weights)
        if self.interactions is not None:
            for m in self.interactions.modules():
                if isinstance(m, MSDeformAttn):
                    m.reset_parameters()

    # ------------------------------------------------------------------ inputs
    def resize_inputs(self, x: Tensor) -> list[Tensor]:
        """Validate the input and produce each branch's view (finest branch gets ``x`` itself)."""
        if torch.jit.is_tracing():
            raise ValueError(TRACE_REFUSAL)
        if not isinstance(x, Tensor):
            raise ValueError(f"PIIP input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PIIP input must be (B, 3, H, W), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"PIIP input must be a floating-point tensor (float32/bfloat16/float16), got {x.dtype}")
        h, w = x.shape[-2:]
        stride = self.cfg.branches[0].max_stride
        if h % stride or w % stride:
            raise ValueError(f"branch 0 ({_describe(self.cfg.branches[0])}) cannot take a {h}x{w} input: height and "
                             f"width must be multiples of {stride} (e.g. {_round_up(h, stride)}x{_round_up(w, stride)})")
        dtype = next(self.branches[0].parameters()).dtype
        views = []
        for br, bc, s in zip(self.branches, self.cfg.branches, self.scales):
            # resized in float32 at any precision (as the released code), then cast to the weights' dtype
            v = x.to(dtype) if s >= 1 else F.interpolate(x.float(), scale_factor=s, mode="bilinear",
                                                         align_corners=False).to(dtype)
            try:
                br.check_input(*v.shape[-2:])
            except ValueError as e:  # a view needs one patch (ViT) / one token after the last downsampling
                need = _smallest_input(s, bc.max_stride, stride)
                raise ValueError(f"a {h}x{w} input is too small for this model: {e}. The smallest input it takes is "
                                 f"{need}x{need} (any height and width >= {need}, multiples of {stride})") from None
            views.append(v)
        return views

    def smallest_input(self) -> int:
        """Smallest side (a multiple of the input stride) every branch's view of it still covers."""
        stride = self.cfg.branches[0].max_stride
        return max(_smallest_input(s, bc.max_stride, stride) for bc, s in zip(self.cfg.branches, self.scales))

    # ------------------------------------------------------------------ forward
    def forward_branches(self, x: Tensor) -> list[Tokens]:
        """Run all branches with interactions; returns each branch's final tokens."""
        return self.forward_views(self.resize_inputs(x))

    def forward_views(self, views: list[Tensor], taps: Optional[list[Tensor]] = None) -> list[Tokens]:
        """Like :meth:`forward_branches` but with each branch's view given explicitly; the merged
        maps after the ``out_groups`` are appended to ``taps`` when it is given."""
        if len(views) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} views (one per branch), got {len(views)}")
        states = [br.embed(v) for br, v in zip(self.branches, views)]
        for g in range(self.num_groups):
            states = [br.forward_group(t, g) for br, t in zip(self.branches, states)]
            if self.interactions is not None:
                xs = self.interactions[g]([t.x for t in states], [t.hw for t in states])
                states = [t._replace(x=nx) for t, nx in zip(states, xs)]
            if taps is not None and g in self.out_groups:
                taps.append(self.merge_tokens(states, g))
        return states

    def merge_tokens(self, states: list[Tokens], group: Optional[int] = None) -> Tensor:
        """Branch states -> one map at the finest branch's grid (``group``: an intermediate merge)."""
        maps = [_to_map(t) for t in states]
        merge = self.merge if group is None or self.inter_merges is None else self.inter_merges[str(group)]
        if merge is None and len(maps) > 1:
            raise RuntimeError("this model has no branch merging (merge=None); use forward_branches()")
        return merge(maps) if merge is not None else maps[0]

    def forward_features(self, x: Tensor) -> Tensor:
        """Final merged (B, C, h, w) map at the finest branch's last grid, before the pyramid."""
        return self.merge_tokens(self.forward_branches(x))

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        """The merged maps after each of ``out_groups`` and the final one (what the pyramid reads)."""
        taps: list[Tensor] = []
        states = self.forward_views(self.resize_inputs(x), taps)
        return taps + [self.merge_tokens(states)]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.out_groups:
            return self.pyramid(self.forward_maps(x))
        feats = self.forward_features(x)
        if self.pyramid is None:
            return OrderedDict([("0", feats)])
        return self.pyramid(feats)

    # ------------------------------------------------------------------ misc
    @property
    def branch_resolutions(self) -> list[float]:
        return [b.img_size for b in self.cfg.branches]

    def extra_repr(self) -> str:
        return f"resolutions={[round(r, 1) for r in self.branch_resolutions]}, edges={self.edges}"

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n.endswith(("pos_embed", "cls_token")) or "gamma" in n or ".weights." in n}


def _to_map(t: Tokens) -> Tensor:
    b, n, c = t.x.shape
    return t.x.transpose(1, 2).reshape(b, c, t.hw[0], t.hw[1])


def _describe(b: Any) -> str:
    return f"{b.kind} {b.embed_dim}-wide at {round(b.img_size, 1)} px"


def _smallest_input(scale: float, patch: int, stride: int) -> int:
    """Smallest side (a multiple of ``stride``) whose view at ``scale`` still covers ``patch`` pixels."""
    side = stride
    while int(side * scale) < patch:   # interpolate's output size is floor(side * scale)
        side += stride
    return side


def _round_up(v: int, m: int) -> int:
    return max(m, int(math.ceil(v / m)) * m)


def _init_weights(m: nn.Module) -> None:
    """Initialisation of the modules PIIP adds on top of pretrained branches (released code's)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        if m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
