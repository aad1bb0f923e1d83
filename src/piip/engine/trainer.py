"""A small, task-agnostic training loop: AdamW (+ layer decay), warm-up + step/cosine schedule,
gradient clipping, bf16 autocast on GPU, DDP under ``torchrun``, atomic checkpoints and exact resume.

The task supplies ``forward_fn(model, batch, device) -> dict of loss tensors`` (summed for the
backward pass) and a ``collate_fn``; everything else is here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt_io
from .distributed import init_distributed, is_main, unwrap
from .optim import WarmupSchedule, build_optimizer, build_scheduler
from .progress import Progress, RunningMeans
from .sampler import ResumableSampler


@dataclass
class TrainConfig:
    """Defaults are the released detection recipe (AdamW 1e-4, wd 0.05, 1x schedule)."""

    output_dir: str = "runs/train"
    epochs: int = 12
    batch_size: int = 2                      # per process
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None      # None / 1.0 = off
    num_layers: Optional[int] = None         # layer decay depth (default: deepest branch)
    warmup_iters: int = 500
    warmup_ratio: float = 1e-3
    schedule: str = "step"                   # 'step' | 'cosine'
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs
    lr_gamma: float = 0.1
    clip_grad: Optional[float] = None
    amp: Optional[bool] = None               # None = bf16 autocast on GPU only
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    save_every_steps: int = 0                # extra mid-epoch checkpoints (0 = only at epoch ends)
    max_steps: Optional[int] = None          # stop (after saving) at this global step
    log_every: int = 10
    find_unused_parameters: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LossFn = Callable[[nn.Module, Any, torch.device], dict[str, torch.Tensor]]


class Trainer:
    def __init__(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, forward_fn: LossFn,
                 collate_fn: Optional[Callable] = None, extra_state: Optional[dict[str, Any]] = None,
                 epoch_end: Optional[Callable[[nn.Module, int], Optional[dict]]] = None) -> None:
        """``extra_state`` is stored in every checkpoint (e.g. the model config); ``epoch_end`` is
        called on every rank after each epoch with the bare model (e.g. to evaluate)."""
        self.cfg = cfg
        self.device, self.rank, self.world = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed + self.rank)
        self.model = model.to(self.device)
        self.dataset, self.forward_fn, self.collate_fn = dataset, forward_fn, collate_fn
        self.extra_state, self.epoch_end = extra_state or {}, epoch_end
        self.sampler = ResumableSampler(len(dataset), True, cfg.seed, self.rank, self.world)
        self.iters_per_epoch = math.ceil(self.sampler.per_rank / cfg.batch_size)
        self.total_iters = self.iters_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.layer_decay,
                                         num_layers=cfg.num_layers)
        self.schedule = WarmupSchedule(self.total_iters, cfg.warmup_iters, cfg.warmup_ratio,
                                       [e * self.iters_per_epoch for e in cfg.lr_steps], cfg.lr_gamma,
                                       cfg.schedule)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.ddp: Optional[nn.Module] = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoint.pt")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "epoch_step": self.epoch_step,
                "step": self.step, "rng": ckpt_io.rng_state(), "train_config": self.cfg.to_dict(),
                "world_size": self.world, "history": self.history, **self.extra_state}

    def save(self, path: Optional[str] = None) -> None:
        if is_main():
            ckpt_io.save_atomic(self.state_dict(), path or self.checkpoint_path)

    def resume(self, path: str) -> None:
        """Continue exactly where ``path`` stopped: weights, optimizer moments, lr schedule,
        epoch / in-epoch position in the same data order, and RNG states."""
        ck = ckpt_io.load(path, map_location=self.device)
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.epoch_step, self.step = ck["epoch"], ck["epoch_step"], ck["step"]
        self.history = ck.get("history", [])
        if ck.get("world_size", 1) == self.world:
            ckpt_io.set_rng_state(ck["rng"])
        elif is_main():
            print(f"note: resuming with {self.world} processes, checkpoint had {ck.get('world_size')}; "
                  "data order and RNG streams differ from an uninterrupted run")
        if is_main():
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step} "
                  f"({self.epoch_step}/{self.iters_per_epoch} into the epoch)")

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch, skip_batches * self.cfg.batch_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # own generator: creating the loader must not consume the global RNG (exact resume)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.cfg.workers, collate_fn=self.collate_fn,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def train_step(self, batch: Any) -> dict[str, float]:
        net = self.ddp or self.model
        net.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses = self.forward_fn(net, batch, self.device)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step} "
                                     f"({ {k: v.item() for k, v in losses.items()} }); lower --lr or enable --clip-grad")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            loader = self._loader(self.epoch, self.epoch_step)
            means = RunningMeans()
            bar = Progress(self.iters_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", is_main(),
                           cfg.log_every, initial=self.epoch_step)
            for batch in loader:
                stats = self.train_step(batch)
                means.update(**stats)
                self.step += 1
                self.epoch_step += 1
                bar.update(f"lr {self.optimizer.param_groups[-1]['lr']:.2e} {means.format()}")
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                    self.save()
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    bar.close()
                    self.save()
                    if is_main():
                        print(f"stopped at step {self.step} (max_steps); resume with --resume {self.checkpoint_path}")
                    return self.history
            bar.close()
            record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, **means.means()}
            self.epoch += 1
            self.epoch_step = 0
            self.history.append(record)
            self.save()
            if self.epoch_end is not None:
                result = self.epoch_end(unwrap(self.model), self.epoch)
                if result:
                    record["eval"] = result
                    self.save()
        return self.history
