"""Configuration of a PIIP model: plain dataclasses, JSON-serialisable (saved next to weights)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

# pixel normalisations (mean, std) of [0, 1] RGB: ImageNet's statistics (classifiers, ConvNeXt and
# hybrid weights, LLaVA towers) and 0.5 / 0.5 (the released ViT detectors); PIIPConfig.image_norm
# picks one. Kept here, at the bottom, so the models, data, LLaVA and timm metadata share one copy
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
IMAGE_NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": IMAGENET}


@dataclass
class BranchConfig:
    """One branch: a network (``kind`` 'vit' or 'convnext') fed the image at ``img_size`` (its
    registered resolution).

    ``interaction_groups`` lists, for each interaction, the inclusive [first, last] block run
    before it. ``window_sizes`` has one entry per block: 0 = global attention.
    ``pos_grid`` is the grid the position embedding is stored at (the pretraining grid);
    None stores it at this branch's own grid.

    ConvNeXt branches are described by ``stage_dims`` / ``stage_depths`` (4 stages); their block
    list is the released flat one in which every downsampling layer counts as a block, so
    ``depth`` (derived) is ``sum(stage_depths) + 3`` and ``embed_dim`` (derived) the last width.
    ``layer_scale`` is the layer-scale init and ``drop_path`` the last block's rate of the linear
    schedule; ViT-only fields are ignored.

    Pretraining flavours are settings of the one ViT branch (see ``piip.branches.flavours``):
    ``flavour`` names the checkpoint layout (deit | augreg | dinov2 | mae | beitv2 | uniperceiver),
    the other fields below it are the semantics that flavour needs.
    """

    img_size: float
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    kind: str = "vit"
    patch_size: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: Union[bool, str] = True      # True | False | 'qv' (BEiT: q and v biases, no k bias)
    layer_scale: Optional[float] = 1.0
    drop_path: float = 0.0
    cls_token: bool = False
    pos_grid: Optional[int] = 14
    window_sizes: Optional[list[int]] = None
    interaction_groups: Optional[list[list[int]]] = None
    stage_dims: Optional[list[int]] = None
    stage_depths: Optional[list[int]] = None
    flavour: str = "deit"
    norm_eps: float = 1e-6
    # 'learned' (1, g*g, C) | 'learned_cls' (1, 1+g*g, C) with an unused class slot (InternViT-class
    # branches) | 'none' (BEiT) | 'uniperceiver' (spatial table + temporal row 0, LayerNorm after the add)
    pos_layout: str = "learned"
    rel_pos_bias: bool = False             # BEiT: a relative position bias table per attention window
    mlp_act: str = "gelu"                  # 'gelu' | 'gelu_tanh' (flash-attn FusedMLP) | 'quick_gelu' (CLIP)
    patch_bias: bool = True                # CLIP's patch convolution has no bias
    pre_norm: bool = False                 # CLIP's ``ln_pre``: LayerNorm on every token after the position add
    drop_path_schedule: str = "constant"   # 'constant' | 'linear' (linspace(0, drop_path, depth))
    norm: str = "ln"                       # 'ln' | 'rms' (InternViT-6B: weight-only RMSNorm)
    qk_norm: bool = False                  # InternViT-6B: norm on q and k over the full width
    with_cp: bool = False                  # activation checkpointing of every block while training

    def __post_init__(self) -> None:
        if not isinstance(self.img_size, (int, float)) or isinstance(self.img_size, bool) or not self.img_size > 0:
            raise ValueError(f"branch img_size must be a positive number, got {self.img_size!r}")
        rules = _kind_rules(self)
        rules.complete(self)
        if self.window_sizes is None:
            self.window_sizes = [0] * self.depth
        if self.interaction_groups is None:
            self.interaction_groups = rules.default_groups(self)

    @property
    def max_stride(self) -> int:
        """Stride of the branch's coarsest tokens: its input must be a multiple of it."""
        return _kind_rules(self).max_stride(self)


class BranchKindRules:
    """What a :class:`BranchConfig` needs to know about its branch kind: one subclass per kind in
    :data:`BRANCH_KIND_RULES` (the branch modules themselves are in ``piip.branches``)."""

    stride_name = "input stride"   # how an error message names ``max_stride``

    @staticmethod
    def complete(b: BranchConfig) -> None:
        """Check the kind's fields and derive the generic ones (depth, width, windows) from them."""
        raise NotImplementedError

    @staticmethod
    def max_stride(b: BranchConfig) -> int:
        raise NotImplementedError

    @staticmethod
    def default_groups(b: BranchConfig) -> list[list[int]]:
        """The interaction cut when none is given: one group per block."""
        return [[i, i] for i in range(b.depth)]

    @staticmethod
    def per_stage_cut(b: BranchConfig) -> bool:
        """Whether the branch is cut one group per stage (a cut that a depth override keeps)."""
        return False


class ViTRules(BranchKindRules):
    """A ViT of any flavour: widths checked, windows per block, stride = patch size."""

    stride_name = "patch size"

    @staticmethod
    def complete(b: BranchConfig) -> None:
        _check_vit_widths(b)

    @staticmethod
    def max_stride(b: BranchConfig) -> int:
        return b.patch_size


class ConvNeXtRules(BranchKindRules):
    """A ConvNeXt: 4 stages; ``depth`` / ``embed_dim`` / ``window_sizes`` derived from them."""

    @staticmethod
    def complete(b: BranchConfig) -> None:
        if not b.stage_dims or not b.stage_depths or len(b.stage_dims) != 4 \
                or len(b.stage_depths) != 4 or min(b.stage_depths) < 1:
            raise ValueError(f"a convnext branch needs 4 stage_dims and 4 stage_depths >= 1, got "
                             f"stage_dims={b.stage_dims}, stage_depths={b.stage_depths}")
        b.depth = sum(b.stage_depths) + len(b.stage_depths) - 1
        b.embed_dim = b.stage_dims[-1]
        b.window_sizes = [0] * b.depth

    @staticmethod
    def default_groups(b: BranchConfig) -> list[list[int]]:
        """The released cuts: 12 groups for ConvNeXt-T/S/B/L, else one per stage."""
        d = b.stage_depths
        return convnext_groups(d) if d[2] % 9 == 0 else stage_groups(d)

    @staticmethod
    def max_stride(b: BranchConfig) -> int:
        return 4 * 2 ** (len(b.stage_dims) - 1)

    @staticmethod
    def per_stage_cut(b: BranchConfig) -> bool:
        return b.interaction_groups == stage_groups(b.stage_depths)


# ``BranchConfig.kind`` -> its rules; a kind not listed is checked as a ViT (``build_branch`` names it)
BRANCH_KIND_RULES: dict[str, type[BranchKindRules]] = {"vit": ViTRules, "convnext": ConvNeXtRules}


def _kind_rules(b: BranchConfig) -> type[BranchKindRules]:
    return BRANCH_KIND_RULES.get(b.kind, ViTRules)


def _check_vit_widths(b: BranchConfig) -> None:
    """Widths a ViT branch can be built with: checked here so a bad override is one line, not a
    ZeroDivisionError or a shape error deep in the build."""
    for field in ("embed_dim", "num_heads", "depth", "patch_size"):
        v = getattr(b, field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"branch {field} must be a positive integer, got {v!r}")
    if b.embed_dim % b.num_heads:
        lo = max(b.num_heads, b.embed_dim // b.num_heads * b.num_heads)
        raise ValueError(f"branch embed_dim {b.embed_dim} is not divisible by num_heads {b.num_heads}; use "
                         f"embed_dim {lo} or {lo + b.num_heads}, or a num_heads that divides {b.embed_dim}")


def check_img_size(cfg: "PIIPConfig", name: str = "img_size") -> None:
    """The finest branch's resolution must be a multiple of its input stride (the patch size of a
    ViT, 32 for a ConvNeXt): it is the input size. One check for Python and the CLI (``name`` is how
    the caller spells the setting)."""
    size, patch = cfg.branches[0].img_size, cfg.branches[0].max_stride
    size = round(size) if abs(size - round(size)) < 1e-6 else size   # float rounding of rescaled configs
    if size != int(size) or int(size) % patch:
        lo, hi = max(patch, int(size) // patch * patch), (int(size) // patch + 1) * patch
        what = _kind_rules(cfg.branches[0]).stride_name
        raise ValueError(f"{name} {size:g} is not a multiple of the finest branch's {what} {patch}; "
                         f"use {lo} or {hi}")


def strict_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` for a dataclass, naming unknown keys (e.g. from a newer or foreign checkpoint)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)


@dataclass
class PIIPConfig:
    """A whole model. Branches are ordered from the finest resolution (smallest model) up."""

    branches: list[BranchConfig]
    attn_type: str = "deform"          # 'deform' | 'normal' cross-attention in interactions
    deform_num_heads: int = 16
    n_points: int = 4
    deform_ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    interaction_drop_path: float = 0.4
    interaction_proj: bool = True
    interaction_norm: bool = True             # False: identity norms in the interactions (released '_speedup')
    edges: Optional[list[list[int]]] = None   # directed (src, dst); None = bidirectional adjacent
    merge: Optional[str] = "conv"            # 'conv' | 'linear' | 'gn_linear' | 'regular_fpn' | None
    pyramid: Optional[str] = "gn"            # 'gn' | 'ln' | None
    # groups after which an extra merged map is output (regular FPN, released: [0, 1, 10]); the
    # pyramid then takes these maps and the final one, each at its own stride and width
    out_groups: Optional[list[int]] = None
    image_norm: str = "half"                  # pixel normalisation the weights expect: 'half' | 'imagenet'
    pyramid_levels: Optional[list[int]] = None  # pyramid maps returned (0..3 = strides 4..32); None = all
    task: str = "dense"                       # 'dense' | 'classification' | 'features' (branch tokens only: LLaVA)
    head: str = "cls_token"                   # classification: 'cls_token' | 'merged'
    # token the per-branch heads read: 'cls' (the class token) or 'first_patch' (what the released
    # classification code actually feeds its heads: token 0 after the class token is split off)
    head_token: str = "cls"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("a PIIP model needs at least one branch")
        check_img_size(self)

    @property
    def img_size(self) -> float:
        return self.branches[0].img_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PIIPConfig":
        d = dict(d)
        d["branches"] = [BranchConfig(**b) for b in d["branches"]]
        return cls(**d)

    def replace(self, **overrides: Any) -> "PIIPConfig":
        """A copy with overrides. ``img_size`` rescales every branch together; ``branches`` may be
        a dict applied to every branch or a list of per-branch dicts."""
        overrides = dict(overrides)
        branches = [dataclasses.replace(b) for b in self.branches]
        if "img_size" in overrides:
            size = overrides.pop("img_size")
            if not isinstance(size, (int, float)) or size <= 0:
                raise ValueError(f"img_size must be a positive number, got {size!r}")
            factor = size / self.branches[0].img_size
            for b in branches:
                b.img_size = b.img_size * factor
            # (branches[0] keeps size * 1.0: check_img_size allows its float rounding; setting it to `size` exactly
            # changed the coarser branches' scale factors by an ulp, and with them the exported ONNX graph)
        if "branches" in overrides:
            bo = overrides.pop("branches")
            if not isinstance(bo, (dict, list, tuple)) or not all(isinstance(o, dict) or o is None for o in
                                                                   ([bo] if isinstance(bo, dict) else bo)):
                raise ValueError(f"branches override must be a dict (applied to every branch) or a list of dicts "
                                 f"(one per branch), got {type(bo).__name__} {bo!r:.60}")
            per = [bo] * len(branches) if isinstance(bo, dict) else list(bo)
            if len(per) != len(branches):
                raise ValueError(f"branches override has {len(per)} entries, model has {len(branches)} branches")
            branches = [_replace_branch(b, o or {}) for b, o in zip(branches, per)]
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown model overrides {sorted(unknown)}; valid: img_size, {sorted(names)}")
        return dataclasses.replace(self, branches=branches, **overrides)


def _replace_branch(b: BranchConfig, o: dict[str, Any]) -> BranchConfig:
    names = {f.name for f in dataclasses.fields(b)}
    unknown = set(o) - names
    if unknown:
        raise ValueError(f"unknown branch overrides {sorted(unknown)}; valid: {sorted(names)}")
    new = dataclasses.replace(b, **o)
    if "depth" in o and "window_sizes" not in o:
        new.window_sizes = (list(b.window_sizes) * new.depth)[:new.depth] if b.window_sizes else None
    if ("depth" in o or "stage_depths" in o) and "interaction_groups" not in o:
        # a per-stage cut (ConvNeXt baselines) stays per-stage; anything else gets the default cut
        per_stage = _kind_rules(b).per_stage_cut(b)
        new.interaction_groups = stage_groups(new.stage_depths) if per_stage and new.stage_depths else None
    new.__post_init__()
    return new


def uniform_groups(depth: int, num_groups: int) -> list[list[int]]:
    """Split ``depth`` blocks into ``num_groups`` equal consecutive groups."""
    if depth % num_groups:
        raise ValueError(f"cannot split {depth} blocks into {num_groups} equal interaction groups")
    k = depth // num_groups
    return [[i * k, i * k + k - 1] for i in range(num_groups)]


def windows(depth: int, size: int, global_every: Optional[int] = None) -> list[int]:
    """Window size per block; with ``global_every=n`` every n-th block (n-1, 2n-1, ...) is global."""
    return [0 if global_every and (i + 1) % global_every == 0 else size for i in range(depth)]


def convnext_groups(stage_depths: list[int], stage2_groups: int = 9) -> list[list[int]]:
    """The released 12-group cut: stage 0; ds1 + stage 1; stage 2 in ``stage2_groups`` equal runs
    (the first with ds2); ds3 + stage 3. T (9 blocks in stage 2): runs of 1; S/B/L (27): runs of 3."""
    d0, d1, d2, d3 = stage_depths
    if d2 % stage2_groups:
        raise ValueError(f"stage 2 has {d2} blocks, not divisible into {stage2_groups} interaction groups")
    k, ds2 = d2 // stage2_groups, d0 + d1 + 1
    lasts = [d0 - 1, d0 + d1] + [ds2 + (i + 1) * k for i in range(stage2_groups)] + [ds2 + d2 + 1 + d3]
    return _ranges(lasts)


def _ranges(lasts: list[int]) -> list[list[int]]:
    """Consecutive [first, last] ranges ending at ``lasts``."""
    out, prev = [], -1
    for last in lasts:
        out.append([prev + 1, last])
        prev = last
    return out


def stage_groups(stage_depths: list[int]) -> list[list[int]]:
    """One group per stage (its downsampling layer included): the baselines' four stage maps."""
    lasts, n = [], -1
    for s, d in enumerate(stage_depths):
        n += d + (1 if s > 0 else 0)
        lasts.append(n)
    return _ranges(lasts)
