"""PIIPBackbone: N branches + interactions + branch merging + simple feature pyramid.

One implementation for any number of branches and every task; a single-branch config is a
plain ViT / ViTDet backbone.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch.nn.init import trunc_normal_
from torch import Tensor, nn

from .branches import Tokens, build_branch
from .config import PIIPConfig
from .integrations.timm_cfg import PretrainedCfgMixin
from .layers.deform_attn import MSDeformAttn
from .layers.interaction import InteractionGroup, default_edges, validate_edges
from .layers.merge import BranchMerge
from .layers.pyramid import LEVEL_STRIDES, SimpleFeaturePyramid
from .ops.resize import resize_view, view_ratio, view_size


TRACE_REFUSAL = ("PIIP models cannot be traced by torch.jit.trace or the TorchScript-based torch.onnx.export "
                 "(dynamo=False): the traced graph would hold one input size's branch sizes and be wrong at "
                 "others; use torch.export.export, torch.onnx.export(..., dynamo=True) or `piip export`")


class PIIPBackbone(PretrainedCfgMixin, nn.Module):
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
        # exact ratios of the registered resolutions (an img_size override rescales them in floats,
        # 1120/1568 -> 45.714.../63.999...): view sizes are computed from them in integers (ops/resize.py)
        self.view_ratios = [view_ratio(b.img_size, base) for b in cfg.branches]
        self.scales = [num / den for num, den in self.view_ratios]
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
        for br, (num, den) in zip(self.branches, self.view_ratios):
            # resized in float32 at any precision (as the released code), then cast to the weights' dtype
            v = x.to(dtype) if num >= den else resize_view(x.float(), num, den).to(dtype)
            try:
                br.check_input(*v.shape[-2:])
            except ValueError as e:  # a view needs one patch (ViT) / one token after the last downsampling
                # the side every branch's view can take, not just this one's
                need = self.smallest_input()
                raise ValueError(f"a {h}x{w} input is too small for this model: {e}. The smallest input it takes is "
                                 f"{need}x{need} (any height and width >= {need}, multiples of {stride})") from None
            views.append(v)
        return views

    def smallest_input(self) -> int:
        """Smallest side (a multiple of the input stride) every branch's view of it still covers."""
        stride = self.cfg.branches[0].max_stride
        return max(_smallest_input(r, bc.max_stride, stride) for bc, r in zip(self.cfg.branches, self.view_ratios))

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
            states = self.forward_group(states, g)
            if self.interactions is not None:
                xs = self.interactions[g]([t.x for t in states], [t.hw for t in states])
                states = [t._replace(x=nx) for t, nx in zip(states, xs)]
            if taps is not None and g in self.out_groups:
                taps.append(self.merge_tokens(states, g))
        return states

    def forward_group(self, states: list[Tokens], group: int) -> list[Tokens]:
        """Every branch's blocks of one group, one branch after another. The branches are
        independent here (they meet only in the interactions after it), so a schedule that runs them
        concurrently replaces this on an instance (``benchmarks/branch_concurrency.py``: threads on CPU,
        CUDA streams)."""
        return [br.forward_group(t, group) for br, t in zip(self.branches, states)]

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

    # ------------------------------------------------------------------ timm model interface
    # (timm.create_model, features_only, resolve_model_data_config, create_optimizer_v2(layer_decay=...))
    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's per-feature metadata: the pyramid levels forward returns (dense models), else each
        branch's final map (towers, classifiers); ``reduction`` is the stride w.r.t. the input."""
        if self.cfg.task == "dense":
            levels = self.pyramid.levels if self.pyramid is not None else range(len(self.out_channels))
            return [{"num_chs": self.out_channels[lv], "reduction": self.out_strides[lv], "module": f"level{lv}"}
                    for lv in levels]
        return [{"num_chs": br.out_dim, "reduction": _exact(br.group_strides[-1] / s), "module": f"branches.{i}"}
                for i, (br, s) in enumerate(zip(self.branches, self.scales))]

    @property
    def num_features(self) -> int:
        """Channels of the last feature map (timm's ``num_features`` of a headless model)."""
        return self.feature_info[-1]["num_chs"]

    def forward_intermediates(self, x: Tensor, indices: Any = None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False) -> Any:
        """timm's signature: the :attr:`feature_info` maps picked by ``indices`` (None: all, int: the
        last n, list: those), with the final features unless ``intermediates_only``. PIIP computes
        every level together, so ``stop_early`` saves nothing; there is no extra ``norm``."""
        if self.cfg.task == "dense":
            maps = list(self(x).values())
            final: Any = maps[-1]
        else:
            final = self.forward_branches(x)
            maps = [_to_map(t) for t in final]
        return take_intermediates(maps, final, indices, norm, output_fmt, intermediates_only)

    def group_matcher(self, coarse: bool = False) -> Any:
        return group_matcher(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every ViT branch block in the backward pass (``with_cp``); ConvNeXt branches run as is."""
        vits = [br for br in self.branches if br.supports_grad_checkpointing]
        if enable and not vits:
            raise ValueError("gradient checkpointing is implemented for ViT branches; this model has none")
        for br in vits:
            br.cfg.with_cp = bool(enable)

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int = 0, global_pool: Optional[str] = None) -> None:
        if num_classes:
            raise ValueError(f"a {self.cfg.task} PIIP backbone has no classifier (num_classes={num_classes}); build a "
                             "'_cls' model or put a head on its feature maps")


def take_intermediates(maps: list[Tensor], final: Any, indices: Any, norm: bool, output_fmt: str,
                       intermediates_only: bool) -> Any:
    """The ``indices`` of ``maps`` in ``output_fmt`` ('NCHW' or 'NLC'), as timm's forward_intermediates."""
    from timm.models._features import feature_take_indices
    if norm:
        raise ValueError("norm=True: PIIP feature maps have no separate final norm to apply")
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take, _ = feature_take_indices(len(maps), indices)
    out = [maps[i] for i in take]
    if output_fmt == "NLC":
        out = [m.flatten(2).transpose(1, 2) for m in out]
    return out if intermediates_only else (final, out)


def layer_ids(model: nn.Module, num_layers: Optional[int] = None,
              skip_strides: Optional[Sequence[float]] = None) -> tuple[dict[str, int], int]:
    """Layer id of every parameter name for layer-wise lr decay (rules: ``piip.engine.optim``), and
    num_layers (default: the deepest decayed branch's depth). Each branch names its own parameters' ids
    (``Branch.layer_id``); a branch's block stride defaults to the deepest branch's depth over its own."""
    backbones = [(n, m) for n, m in model.named_modules() if isinstance(m, PIIPBackbone)]
    if not backbones:
        raise ValueError("layer-wise lr decay needs a model containing a PIIPBackbone")
    prefix, bb = backbones[0]
    prefix = prefix + "." if prefix else ""
    depths = [br.decay_depth for br in bb.branches]
    n = len(depths)
    num_layers = num_layers or max(depths) or 1
    if skip_strides is None:
        strides = [max(1.0, max(depths) / d) if d else 1.0 for d in depths]
        strides[-1] = 1
    else:  # official order: for official branch2, branch3, ... = our n-2, n-3, ...
        if len(skip_strides) != n - 1:
            raise ValueError(f"skip_strides needs {n - 1} entries (one per branch but the largest), got {skip_strides}")
        strides = [float(skip_strides[n - 2 - k]) for k in range(n - 1)] + [1.0]
    top = num_layers + 1
    ids = {}
    for name, _ in model.named_parameters():
        m = _BRANCH_PARAM.match(name[len(prefix):]) if name.startswith(prefix) else None
        lid = bb.branches[int(m.group(1))].layer_id(m.group(2), strides[int(m.group(1))], top) if m else None
        ids[name] = top if lid is None else lid
    return ids, num_layers


_BRANCH_PARAM = re.compile(r"branches\.(\d+)\.(.*)")


def group_matcher(model: nn.Module) -> Any:
    """timm's layer grouping as a callable: the layer id piip's own layer-wise lr decay gives each
    parameter (embeddings 0, ViT blocks by depth, everything else last)."""
    ids, _ = layer_ids(model)
    top = max(ids.values())
    return lambda name: ids.get(name, top)


def _exact(v: float) -> Any:
    return int(v) if float(v).is_integer() else round(v, 3)


def _to_map(t: Tokens) -> Tensor:
    b, n, c = t.x.shape
    return t.x.transpose(1, 2).reshape(b, c, t.hw[0], t.hw[1])


def _describe(b: Any) -> str:
    return f"{b.kind} {b.embed_dim}-wide at {round(b.img_size, 1)} px"


def _smallest_input(ratio: tuple[int, int], patch: int, stride: int) -> int:
    """Smallest side (a multiple of ``stride``) whose view at ``ratio`` still covers ``patch`` pixels."""
    num, den = ratio
    side = stride
    while (view_size(side, side, num, den)[0] if num < den else side) < patch:
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
