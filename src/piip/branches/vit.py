"""The ViT branch with optional window attention; every pretraining flavour (DeiT, DeiT III,
AugReg, DINOv2, MAE, BEiTv2, Uni-Perceiver) is a setting of this one class (``flavours.py``)."""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.nn.init import trunc_normal_
from torch import Tensor, nn

from ..config import BranchConfig
from ..layers.attention import Attention
from ..layers.drop import DropPath, inactive
from ..layers.linear import unhooked
from ..layers.mlp import Mlp
from ..layers.norm import make_norm
from ..ops import derived, opaque
from ..ops.symbolic import concrete, grad_wanted, same_sizes, tracing
from .base import Branch, FlopPart, Tokens
from .flavours import FLAVOURS, POS_LAYOUTS

# Uni-Perceiver's temporal position table (row 0 is added to every image token)
UNIPERCEIVER_TEMPORAL_ROWS = 8
# parameters of the embedding (Uni-Perceiver's visual_embed included): layer 0 of layer-wise lr decay
EMBEDDING_PARAMS = ("patch_embed", "pos_embed", "cls_token", "temporal_pos_embed", "embed_norm")


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (gamma_1, gamma_2); ``norm`` 'ln' or
    'rms' (InternViT-6B, which also normalises queries and keys: ``qk_norm``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool | str = True,
                 layer_scale: Optional[float] = None, drop_path: float = 0.0, window_size: int = 0,
                 norm_eps: float = 1e-6, rel_pos_bias: bool = False, mlp_act: str = "gelu",
                 norm: str = "ln", qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, window_size=window_size, rel_pos_bias=rel_pos_bias,
                              qk_norm=qk_norm, norm=norm, norm_eps=norm_eps)
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=mlp_act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if inactive(self.drop_path) and unhooked(self.attn, Attention) and unhooked(self.mlp, Mlp):
            # the projections add the (layer-scaled) residuals as they write out (piip.ops.linear)
            x = self.attn(self.norm1(x), hw, residual=x, scale=self.gamma_1)
            return self.mlp(self.norm2(x), residual=x, scale=self.gamma_2)
        a = self.attn(self.norm1(x), hw)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def resize_pos_embed(pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """(1, h*w, C) position table -> (1, H*W, C) by bicubic interpolation (float32, no corners)."""
    if same_sizes(src_grid, dst_grid):
        return pos
    c = pos.shape[-1]
    grid = pos.float().reshape(1, src_grid[0], src_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(pos.dtype)


# resized tables kept per position parameter (detection sees a new input size with every image)
POS_TABLES_KEPT = 8


def pos_table(pos_embed: Tensor, slot: int, src_grid: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """``pos_embed`` (class slot dropped) resized to ``hw``, computed once per state of the parameter
    (``piip.ops.derived``: any change, in place or by replacement, recomputes; a table made under
    ``inference_mode`` has no version counter and is recomputed on every call); the last
    ``POS_TABLES_KEPT`` sizes are kept. No gradient."""
    return derived.cached("pos_table", (pos_embed,),
                          lambda: resize_pos_embed(pos_embed.detach()[:, slot:], tuple(src_grid), tuple(hw)),
                          slot, tuple(src_grid), tuple(hw), limit=POS_TABLES_KEPT)


@torch.library.custom_op("piip::add_pos_table", mutates_args=())
def _add_pos_op(x: Tensor, pos_embed: Tensor, slot: int, src_grid: list[int], hw: list[int]) -> Tensor:
    """``x + pos_table(...)`` as one opaque op of a compiled inference graph (:mod:`piip.ops.opaque`)."""
    table = pos_table(pos_embed, slot, (src_grid[0], src_grid[1]), (hw[0], hw[1])).to(x.dtype)
    return torch.add(x, table, out=x.new_empty(x.shape))


@_add_pos_op.register_fake
def _(x: Tensor, pos_embed: Tensor, slot: int, src_grid: list[int], hw: list[int]) -> Tensor:
    return x.new_empty(x.shape)


def drop_path_rates(rate: float, depth: int, schedule: str) -> list[float]:
    """Per-block drop-path rates: DeiT-class branches use one rate, the others linspace(0, rate, depth)."""
    if schedule == "constant":
        return [rate] * depth
    if schedule == "linear":
        return torch.linspace(0, rate, depth, device="cpu").tolist()  # cpu: also under a meta device context
    raise ValueError(f"drop_path_schedule must be 'constant' or 'linear', got {schedule!r}")


class ViTBranch(Branch):
    """A ViT cut into interaction groups. Keys follow timm/official DeiT names (patch_embed.proj,
    pos_embed, cls_token, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,gamma_1,gamma_2});
    other flavours' names are mapped at load time (``piip.weights.vit_layouts``).

    Position layouts: ``learned`` stores ``(1, g*g, C)``; ``learned_cls`` stores ``(1, 1+g*g, C)``
    whose slot 0 is never used (kept so official checkpoints load strictly); ``none`` has no
    table; ``uniperceiver`` adds ``temporal_pos_embed[0]`` too and LayerNorms the embedding.
    """

    kind = "vit"
    label = "ViT"
    supports_grad_checkpointing = True

    def __init__(self, cfg: BranchConfig, name: str = "branch") -> None:
        super().__init__()
        self.cfg, self.name = cfg, name
        self.patch_size = cfg.patch_size
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"{name}: embed_dim={cfg.embed_dim} not divisible by num_heads={cfg.num_heads}")
        if len(cfg.window_sizes) != cfg.depth:
            raise ValueError(f"{name}: window_sizes has {len(cfg.window_sizes)} entries for depth {cfg.depth}")
        if cfg.cls_token and any(w > 0 for w in cfg.window_sizes):
            raise ValueError(f"{name}: a class token cannot be combined with windowed attention")
        if cfg.flavour not in FLAVOURS:
            raise ValueError(f"{name}: unknown ViT flavour {cfg.flavour!r}; available: {sorted(FLAVOURS)}")
        if cfg.pos_layout not in POS_LAYOUTS:
            raise ValueError(f"{name}: pos_layout must be one of {POS_LAYOUTS}, got {cfg.pos_layout!r}")
        if cfg.rel_pos_bias and any(w <= 0 for w in cfg.window_sizes):
            raise ValueError(f"{name}: rel_pos_bias (BEiT) needs windowed attention in every block")
        self.groups = _check_groups(cfg.interaction_groups, cfg.depth, name)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, bias=cfg.patch_bias)
        grid = cfg.pos_grid or max(1, int(cfg.img_size) // cfg.patch_size)
        self.pos_grid = (grid, grid)
        self.pos_slot = int(cfg.pos_layout == "learned_cls")
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.pos_slot + grid * grid, cfg.embed_dim))
                          if cfg.pos_layout != "none" else None)
        if cfg.pos_layout == "uniperceiver":
            self.temporal_pos_embed = nn.Parameter(torch.zeros(UNIPERCEIVER_TEMPORAL_ROWS, cfg.embed_dim))
            self.embed_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        else:
            self.temporal_pos_embed = self.embed_norm = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.cls_token else None
        # CLIP: the class embedding carries its own position (folded in at load time), then ln_pre
        self.ln_pre = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        dpr = drop_path_rates(cfg.drop_path, cfg.depth, cfg.drop_path_schedule)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale, dp, ws,
                  norm_eps=cfg.norm_eps, rel_pos_bias=cfg.rel_pos_bias, mlp_act=cfg.mlp_act,
                  norm=cfg.norm, qk_norm=cfg.qk_norm)
            for dp, ws in zip(dpr, cfg.window_sizes))
        self.group_dims = [cfg.embed_dim] * len(self.groups)
        self.group_strides = [cfg.patch_size] * len(self.groups)
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_input(self, h: int, w: int) -> None:
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"{self.name} received a {h}x{w} view, "
                             f"smaller than one patch; use a larger input (at least {p} px per side for this branch)")

    def pos_embed_for(self, hw: tuple[int, int]) -> Tensor:
        """Position table at grid ``hw`` (class slot dropped); without a gradient kept between
        calls while the parameter is unchanged (:func:`pos_table`)."""
        if grad_wanted(self.pos_embed) or tracing() or not concrete(hw):   # traced / symbolic
            return resize_pos_embed(self.pos_embed[:, self.pos_slot:], self.pos_grid, hw)
        return pos_table(self.pos_embed, self.pos_slot, self.pos_grid, hw)

    def embed(self, img: Tensor) -> Tokens:
        x, hw = self.patch_embed(img)
        if self.pos_embed is not None and opaque.wanted(x, self.pos_embed):
            # compiled inference: the kept table, not a bicubic resize in every run of the graph
            x = _add_pos_op(x, self.pos_embed, self.pos_slot, list(self.pos_grid), [hw[0], hw[1]])
        elif self.pos_embed is not None:
            x = x + self.pos_embed_for(hw).to(x.dtype)
        if self.temporal_pos_embed is not None:
            x = self.embed_norm(x + self.temporal_pos_embed[:1].to(x.dtype))
        cls = self.cls_token.expand(x.shape[0], -1, -1) if self.cls_token is not None else None
        if self.ln_pre is not None:
            x, cls = self.ln_pre(x), (self.ln_pre(cls) if cls is not None else None)
        return Tokens(x, hw, cls)

    def forward_group(self, tokens: Tokens, group: int) -> Tokens:
        x, hw, cls = tokens
        first, last = self.groups[group]
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
        # with_cp (released InternViT-class branches): recompute each block in the backward pass
        cp = self.cfg.with_cp and self.training and torch.is_grad_enabled()
        for blk in self.blocks[first:last + 1]:
            x = checkpoint(blk, x, hw, use_reentrant=False) if cp else blk(x, hw)
        if cls is not None:
            # the patch tokens as their own tensor: the interaction units read them three times
            # (norm, residual, feature path), and each would otherwise copy the strided slice
            cls, x = x[:, :1], x[:, 1:]
            x = x.contiguous() if group + 1 < len(self.groups) else x
        return Tokens(x, hw, cls)

    # ------------------------------------------------------------------ what layers above ask
    @property
    def decay_depth(self) -> int:
        return self.cfg.depth

    def layer_id(self, name: str, stride: float, top: int) -> Optional[int]:
        """Embedding: 0; block i: ``floor((i + 1) * stride)`` (released constructor); the rest: top."""
        if name.startswith(EMBEDDING_PARAMS):
            return 0
        if name.startswith("blocks."):
            return min(top, math.floor((int(name.split(".")[1]) + 1) * stride + 1e-9))
        return None

    def flop_parts(self, view: tuple[int, int], patch_attention: bool = False) -> list[FlopPart]:
        """The whole branch on its token grid (class token included), the patch convolution on the view;
        ``patch_attention``: attention products on the N patch tokens, its projections on N + 1."""
        grid = (view[0] // self.patch_size, view[1] // self.patch_size)
        n = grid[0] * grid[1]
        reads = {id(self.patch_embed): (n, view)}
        if patch_attention:
            for blk in self.blocks:
                reads.update({id(blk.attn): (n, grid), id(blk.attn.qkv): (n + 1, grid), id(blk.attn.proj): (n + 1, grid)})
        return [FlopPart(self, n + int(self.cls_token is not None), grid, reads)]

    def params_at(self, view: tuple[int, int]) -> int:
        """The position table (and any class slot) counted at the view's grid, not the stored one."""
        n = sum(p.numel() for p in self.parameters())
        if self.pos_embed is None:
            return n
        grid = (view[0] // self.patch_size) * (view[1] // self.patch_size)
        return n + (grid + self.pos_slot) * self.pos_embed.shape[-1] - self.pos_embed.numel()


def _check_groups(groups: list[list[int]], depth: int, name: str) -> list[tuple[int, int]]:
    out, expected = [], 0
    for g in groups:
        if len(g) != 2 or g[0] != expected or g[1] < g[0]:
            raise ValueError(f"{name}: interaction_groups {groups} must be consecutive [first, last] block ranges "
                             f"covering blocks 0..{depth - 1}")
        out.append((int(g[0]), int(g[1])))
        expected = g[1] + 1
    if expected != depth:
        raise ValueError(f"{name}: interaction_groups {groups} cover {expected} blocks, branch has {depth}")
    return out
