"""Fully sharded data parallel training (PyTorch FSDP2, ``fully_shard``) and sharded checkpoints.

Why: PIIP-H6B / LH6B (6.9-7.3B parameters) do not fit one GPU with DDP: weights, gradients and
AdamW moments alone take 16 bytes per parameter (110 GB for H6B). FSDP shards all three over the
processes and gathers one unit's weights at a time. Units (vision_spec §C.3): every transformer
block of every branch, every interaction group (the released "interaction unit"), the branch
merging and the feature pyramid (0.3B / 0.1B parameters at H6B's 3200 width), then the rest of the
model (embeddings, detection heads) as the root unit.

Mixed precision follows the released recipe: the backbone's blocks and interactions compute with
bfloat16 weights (gradients reduced in float32), the root (heads) keeps float32 weights under
autocast; deformable sampling always runs in float32 (``layers.deform_attn``).

Checkpoints are written with ``torch.distributed.checkpoint`` (one file per process plus metadata)
under fully-qualified parameter names, so a run can resume on a different number of processes,
including one process without FSDP.

FSDP2 cannot shard 0-dim parameters (the branch-merging weights ``w1..wN``, stored 0-dim in the
released checkpoints): they stay replicated on every process and their gradients are averaged by
:func:`sync_replicated_grads`; :func:`clip_grad_norm_` clips sharded and replicated gradients together.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
from torch import nn

from .distributed import barrier, is_main


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as their own units: branch blocks, interaction groups, merging, pyramid."""
    from ..branches.base import Branch
    from ..layers.interaction import InteractionGroup
    from ..layers.merge import BranchMerge
    from ..layers.pyramid import SimpleFeaturePyramid
    units: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Branch):
            units += m.fsdp_units()
        elif isinstance(m, (InteractionGroup, BranchMerge, SimpleFeaturePyramid)):
            units.append(m)
    return units


def shard_model(model: nn.Module, param_dtype: Optional[torch.dtype] = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply ``fully_shard`` to every unit of :func:`fsdp_units`, then to ``model`` (in place).

    ``param_dtype``: compute dtype of the units' weights (bf16 on GPU as released; None = as stored).
    Needs an initialised process group (``torchrun``); gloo (CPU) works as well as nccl."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    unit_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    scalars = {p for p in model.parameters() if p.ndim == 0}  # replicated (module doc)
    for unit in fsdp_units(model):
        fully_shard(unit, mp_policy=unit_mp, reshard_after_forward=reshard_after_forward,
                    ignored_params={p for p in unit.parameters() if p.ndim == 0} or None)
    fully_shard(model, reshard_after_forward=reshard_after_forward, ignored_params=scalars or None)
    return model


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    from torch.distributed.tensor import DTensor
    return [p for p in model.parameters() if not isinstance(p, DTensor)]


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP left replicated (see module doc) over processes."""
    import torch.distributed as dist
    grads = [p.grad for p in _replicated(model) if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the sharded (DTensor) and replicated gradients together."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
    sharded = [p.grad for p in model.parameters() if p.grad is not None and isinstance(p.grad, DTensor)]
    plain = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    total = torch.zeros(())
    if sharded:
        n = get_total_norm(sharded)
        total = n.full_tensor() if isinstance(n, DTensor) else n
    if plain:
        total = torch.hypot(total.to(plain[0].device), get_total_norm(plain))
    for grads in (sharded, plain):
        if grads:
            clip_grads_with_norm_(grads, max_norm, total.to(grads[0].device))
    return total


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Every process writes its shards of the weights and optimizer state into ``directory`` (a new
    folder replaces the old one only once complete). Call on every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    tmp = directory + ".tmp"
    if is_main() and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    barrier()
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    barrier()
    if is_main():
        old = directory + ".old"
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        if os.path.isdir(old):
            shutil.rmtree(old)
    barrier()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Read a :func:`save_sharded` folder into ``model`` / ``optimizer``, resharding to this run's
    processes (FSDP or not). Call on every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"sharded checkpoint folder {directory!r} does not exist (the checkpoint.pt beside "
                                "it points there; copy the whole output folder)")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_model(directory: str) -> dict[str, torch.Tensor]:
    """The whole weights of a :func:`save_sharded` folder in this process (no process group): what
    evaluation, prediction and export read from an FSDP run's checkpoint."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"sharded checkpoint folder {directory!r} does not exist (the checkpoint.pt beside "
                                "it points there; copy the whole output folder)")
    return _load_state_dict_from_keys({"model"}, checkpoint_id=directory)["model"]


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights on CPU, on rank 0 (empty elsewhere); call on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
