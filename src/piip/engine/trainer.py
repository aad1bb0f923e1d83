"""A small, task-agnostic training loop: AdamW (+ layer decay), warm-up + step/cosine schedule,
gradient clipping, bf16 autocast on GPU, DDP or FSDP (``strategy``) under ``torchrun``, atomic checkpoints
(sharded ones with FSDP) and exact resume.

The task supplies ``forward_fn(model, batch, device) -> dict of loss tensors`` (summed for the
backward pass) and a ``collate_fn``; everything else is here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RunFailed, TrainingInterrupted
from . import checkpoint as ckpt_io
from .distributed import init_distributed, is_main, unwrap
from .ema import ModelEMA
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
    schedule: str = "step"                   # 'step' | 'cosine' | 'poly'
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs
    lr_gamma: float = 0.1
    clip_grad: Optional[float] = None
    amp: Optional[bool] = None               # None = bf16 autocast on GPU only
    amp_dtype: str = "bfloat16"              # 'bfloat16' | 'float16' (float16 adds a dynamic loss scaler)
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    save_every_steps: int = 0                # extra mid-epoch checkpoints (0 = only at epoch ends)
    max_steps: Optional[int] = None          # stop (after saving) at this global step
    log_every: int = 10
    find_unused_parameters: bool = False
    # --- additions for classification recipes (defaults keep the detection behaviour) ---
    warmup_epochs: Optional[float] = None    # overrides warmup_iters when set
    min_lr: float = 0.0                      # cosine floor, absolute for every group (0 = anneal to 0)
    lr_scales: dict[str, float] = field(default_factory=dict)  # name regex -> lr multiplier
    decay_all: bool = False                  # weight decay on biases / norms / 1-D params too
    no_decay: list[str] = field(default_factory=list)  # name regexes without weight decay
    ema_decay: Optional[float] = None        # keep an EMA of the weights (saved as 'model_ema')
    accum_steps: int = 1                     # split every batch into this many micro-batches
    repeated_aug: int = 1                    # DeiT repeated augmentation: copies of every image (1 = off)
    strategy: str = "ddp"                    # 'ddp' | 'fsdp' (sharded weights/grads/optimizer, piip.engine.fsdp)

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
        if cfg.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {cfg.strategy!r}")
        # FSDP shards only across processes; one process trains unsharded but writes the same sharded checkpoints
        self.fsdp = cfg.strategy == "fsdp" and self.world > 1
        if self.fsdp:
            if cfg.ema_decay is not None:
                raise ValueError("--ema is not supported with --strategy fsdp (the EMA copy would be unsharded)")
            if cfg.amp_dtype == "float16":
                raise ValueError("--strategy fsdp trains in bfloat16 (the released recipe); use --amp-dtype bfloat16")
            from .fsdp import shard_model
            bf16 = (cfg.amp if cfg.amp is not None else self.device.type == "cuda") and cfg.amp_dtype == "bfloat16"
            shard_model(self.model, torch.bfloat16 if bf16 else None)
        self.dataset, self.forward_fn, self.collate_fn = dataset, forward_fn, collate_fn
        self.extra_state, self.epoch_end = extra_state or {}, epoch_end
        self.sampler = ResumableSampler(len(dataset), True, cfg.seed, self.rank, self.world, cfg.repeated_aug)
        self.iters_per_epoch = math.ceil(self.sampler.per_rank / cfg.batch_size)
        self.total_iters = self.iters_per_epoch * cfg.epochs
        if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
            raise ValueError(f"accum_steps {cfg.accum_steps} must be >= 1 and divide the batch size {cfg.batch_size}")
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.layer_decay,
                                         num_layers=cfg.num_layers, lr_scales=cfg.lr_scales,
                                         decay_all=cfg.decay_all, no_decay=cfg.no_decay)
        warmup = (round(cfg.warmup_epochs * self.iters_per_epoch) if cfg.warmup_epochs is not None
                  else cfg.warmup_iters)
        self.schedule = WarmupSchedule(self.total_iters, warmup, cfg.warmup_ratio,
                                       [e * self.iters_per_epoch for e in cfg.lr_steps], cfg.lr_gamma,
                                       cfg.schedule)
        self.scheduler = build_scheduler(self.optimizer, self.schedule, cfg.min_lr)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        if cfg.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {cfg.amp_dtype!r}")
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.amp and cfg.amp_dtype == "float16" else None)
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self._stop: Optional[str] = None   # name of the signal asking to stop, once one arrived
        self.ddp: Optional[nn.Module] = None
        if self.world > 1 and not self.fsdp:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoint.pt")

    # ------------------------------------------------------------------ state
    def state_dict(self, path: Optional[str] = None) -> dict[str, Any]:
        sharded = self.cfg.strategy == "fsdp"  # weights and optimizer live in the shards folder beside ``path``
        return {"model": SHARDED if sharded else unwrap(self.model).state_dict(),
                "optimizer": SHARDED if sharded else self.optimizer.state_dict(),
                **({"shards": _shards_dir(path or self.checkpoint_path)} if sharded else {}),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "epoch_step": self.epoch_step,
                "step": self.step, "rng": ckpt_io.rng_state(), "train_config": self.cfg.to_dict(),
                "world_size": self.world, "history": self.history, **self.extra_state,
                **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def save(self, path: Optional[str] = None) -> None:
        path = path or self.checkpoint_path
        if self.cfg.strategy == "fsdp":  # every process writes its shards
            from .fsdp import save_sharded
            save_sharded(self.model, self.optimizer, os.path.join(os.path.dirname(path), _shards_dir(path)))
        if is_main():
            ckpt_io.save_atomic(self.state_dict(path), path)

    def resume(self, path: str) -> None:
        """Continue exactly where ``path`` stopped: weights, optimizer moments, lr schedule,
        epoch / in-epoch position in the same data order, and RNG states.

        A checkpoint of another model or config is refused before anything changes."""
        ck = ckpt_io.load(path, map_location=self.device)
        self._check_same_model(ck, path)
        if ck["model"] == SHARDED:  # any strategy and process count can read the shards
            from .fsdp import load_sharded
            load_sharded(self.model, self.optimizer, os.path.join(os.path.dirname(path), ck["shards"]))
        elif self.fsdp:
            raise ValueError(f"--resume {path} is a full (DDP) checkpoint; resume it with --strategy ddp")
        else:
            try:
                unwrap(self.model).load_state_dict(ck["model"])
            except RuntimeError as e:
                raise ValueError(f"--resume {path}: its weights do not fit this model: {str(e).splitlines()[0]} ...") from None
            self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and "grad_scaler" in ck:
            self.scaler.load_state_dict(ck["grad_scaler"])
        if self.ema is not None:
            if "model_ema" in ck:
                self.ema.load_state_dict(ck["model_ema"])
            elif is_main():
                print(f"note: {path} has no EMA weights; the EMA restarts from the resumed weights")
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

    def resume_from(self, arg: Optional[str]) -> None:
        """``--resume`` of the train commands: a checkpoint path, its run folder, 'auto' (this run's
        checkpoint if it exists, else start fresh), or None (start fresh); see :func:`ckpt_io.resume_path`."""
        path = ckpt_io.resume_path(arg, self.cfg.output_dir)
        if path:
            self.resume(path)

    def _check_same_model(self, ck: dict[str, Any], path: str) -> None:
        mine, theirs = self.extra_state.get("model_config"), ck.get("model_config")
        if mine is None or theirs is None or mine == theirs:
            return
        diff = sorted(_diff_keys(mine, theirs))
        here = self.extra_state.get("model_name", "this model")
        raise ValueError(f"--resume {path} was written by {ck.get('model_name', 'another model')} with a different "
                         f"config than this run's {here} (differs in {', '.join(diff[:6])}"
                         f"{' ...' if len(diff) > 6 else ''}); pass the same --model/--override/--img-size/head options "
                         "as that run, or a new --output-dir to start fresh")

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(epoch, skip_batches * self.cfg.batch_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # own generator: creating the loader must not consume the global RNG (exact resume)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.cfg.workers, collate_fn=self.collate_fn,
                          pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_stop_signals,
                          generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def train_step(self, batch: Any) -> dict[str, float]:
        net = self.ddp or self.model
        net.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = self.cfg.accum_steps
        parts = split_batch(batch, n) if n > 1 else [batch]
        totals: dict[str, float] = {}
        for i, part in enumerate(parts):
            # DDP: synchronise gradients on the last micro-batch only
            sync = contextlib.nullcontext() if (self.ddp is None or i == len(parts) - 1) else self.ddp.no_sync()
            if self.fsdp:  # FSDP: reduce-scatter gradients on the last micro-batch only
                self.model.set_requires_gradient_sync(i == len(parts) - 1)
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    losses = self.forward_fn(net, part, self.device)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step} "
                                             f"({ {k: v.item() for k, v in losses.items()} }); lower --lr or enable "
                                             "--clip-grad")
                part_loss = loss / len(parts)
                (self.scaler.scale(part_loss) if self.scaler is not None else part_loss).backward()
            for k, v in {"loss": loss, **losses}.items():
                totals[k] = totals.get(k, 0.0) + v.item() / len(parts)
        if self.fsdp:
            from . import fsdp
            fsdp.sync_replicated_grads(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)   # clip (and skip inf / nan steps) on true gradients
        if self.cfg.clip_grad and self.fsdp:
            fsdp.clip_grad_norm_(self.model, self.cfg.clip_grad)
        elif self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        return totals

    @contextlib.contextmanager
    def _stop_on_signals(self):  # noqa: ANN202
        """SIGINT / SIGTERM: finish the current step, save, raise :class:`TrainingInterrupted`.
        A second SIGINT quits at once without saving (a one-line ``KeyboardInterrupt``; the workers are
        still reaped). Processes forked meanwhile (DataLoader workers, evaluation's included) inherit the
        handler: there SIGINT does nothing (the main process alone decides) and SIGTERM ends them quietly."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        main_pid = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            if os.getpid() != main_pid:   # a forked worker: Ctrl-C is the main process's; SIGTERM ends it quietly
                if signum == signal.SIGTERM:
                    os._exit(0)
                return
            name = signal.Signals(signum).name
            if self._stop is not None and signum == signal.SIGINT:
                path = self.checkpoint_path
                raise KeyboardInterrupt("second Ctrl-C: quit without saving" + (
                    f"; the last completed checkpoint {path} is kept" if os.path.exists(path) else ""))
            self._stop = name
            if is_main():
                print(f"\n{name}: saving a checkpoint after this step (Ctrl-C again to quit without saving)",
                      file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _stop_if_asked(self, bar: Optional[Progress] = None) -> None:
        if self._stop is None:
            return
        if bar is not None:
            bar.close()
        self.save()
        raise TrainingInterrupted(self._stop, self.checkpoint_path, self.step)

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``cfg.epochs`` (or ``cfg.max_steps``); returns the per-epoch records. A failing
        sample, worker, step or evaluation raises :class:`~piip.errors.RunFailed` (one line naming it and
        the checkpoint to resume from; the original error chained as ``__cause__``), workers joined."""
        if self.epoch >= self.cfg.epochs:
            raise ValueError(f"nothing to train: the run is already at epoch {self.epoch} of {self.cfg.epochs}; "
                             "raise --epochs to continue it")
        with self._stop_on_signals():
            return self._fit()

    def _fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            self._stop_if_asked()
            loader = self._loader(self.epoch, self.epoch_step)
            means = RunningMeans()
            bar = Progress(self.iters_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", is_main(),
                           cfg.log_every, initial=self.epoch_step)
            batches = iter(loader)
            try:
                for batch in self._batches(batches, bar):
                    try:
                        stats = self.train_step(batch)
                    except Exception as e:  # noqa: BLE001 - one line naming the step (RunFailed)
                        raise self._failed(f"training step {self.step + 1}", e) from e
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
                    self._stop_if_asked(bar)   # before the next batch is fetched
            finally:   # reap the workers now, on any exit (an error, a second Ctrl-C): never at interpreter exit
                shutdown_workers(batches)
            bar.close()
            record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, **means.means()}
            self.epoch += 1
            self.epoch_step = 0
            self.history.append(record)
            self.save()
            if self.epoch_end is not None and self.fsdp:
                # sharded evaluation gives ranks different numbers of forward passes, which sharded
                # weights cannot serve (every forward is collective): evaluate the checkpoint instead
                if is_main():
                    print(f"note: no evaluation during --strategy fsdp training; run `piip eval ... --checkpoint "
                          f"{self.checkpoint_path}` (the weights are gathered from the shards)")
            elif self.epoch_end is not None:
                try:
                    result = self.epoch_end(unwrap(self.model), self.epoch)
                except Exception as e:  # noqa: BLE001
                    raise self._failed(f"the evaluation after epoch {self.epoch}", e, in_epoch=False) from e
                if result:
                    record["eval"] = result
                    self.save()
        return self.history

    def _batches(self, batches: Any, bar: Progress) -> Any:
        """The epoch's batches; a failed fetch (a sample, a worker) becomes :class:`RunFailed`, or the
        end of a run asked to stop (SIGTERM to the process group also ends the workers)."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001
                self._stop_if_asked(bar)
                raise self._failed(f"loading the data of step {self.step + 1}", e) from e
            yield batch

    def _failed(self, what: str, exc: BaseException, in_epoch: bool = True) -> RunFailed:
        """One line: what failed (in which epoch), why, and what is on disk to resume from."""
        from ..errors import user_message
        code = user_message(exc)[0]
        path = self.checkpoint_path
        kept = (f"the last completed checkpoint {path} is kept; fix the cause and continue with --resume {path}"
                if os.path.exists(path) else "no checkpoint was written yet")
        where = f" (epoch {self.epoch + 1})" if in_epoch else ""
        return RunFailed(f"{what}{where} failed: {error_text(exc)}; {kept} "
                         "(--debug shows the traceback)", code)


SHARDED = "sharded"  # checkpoint.pt's 'model' / 'optimizer' when they are in the shards folder


def _shards_dir(path: str) -> str:
    """Name of the shards folder beside checkpoint file ``path`` (checkpoint.pt -> checkpoint_shards)."""
    return os.path.splitext(os.path.basename(path))[0] + "_shards"


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` (tensors / lists, possibly nested in tuples, lists or dicts) cut into ``n``
    consecutive micro-batches along the first dimension (gradient accumulation)."""
    if torch.is_tensor(batch) or isinstance(batch, list):
        size = len(batch)
        if size < n:
            raise ValueError(f"cannot split a batch of {size} into {n} micro-batches (accum_steps)")
        bounds = [size * i // n for i in range(n + 1)]
        return [batch[bounds[i]:bounds[i + 1]] for i in range(n)]
    if isinstance(batch, tuple):
        cols = [split_batch(x, n) for x in batch]
        return [tuple(c[i] for c in cols) for i in range(n)]
    if isinstance(batch, dict):
        cols = {k: split_batch(v, n) for k, v in batch.items()}
        return [{k: c[i] for k, c in cols.items()} for i in range(n)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} for gradient accumulation")


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loading workers leave Ctrl-C (SIGINT, sent to the whole process group) to the main process,
    which stops them cleanly after saving. SIGTERM ends a worker quietly (exit code 0, so the main
    process is not interrupted mid-step by "worker killed by signal"): the main process, if it got it
    too, still saves; and a terminate() at shutdown always works (an ignored SIGTERM made the
    interpreter's exit wait forever for the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def shutdown_workers(batches: Any) -> None:
    """Stop and join the worker processes of a DataLoader iterator now (a no-op without workers)."""
    stop = getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        stop()


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an error in one line (a DataLoader worker's re-raised traceback reduced to
    the original message); piip's own data errors, whose messages name the sample, without the type."""
    from ..errors import error_message
    msg = error_message(exc)
    return msg if type(exc).__module__.startswith("piip.") else f"{type(exc).__name__}: {msg}"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _diff_keys(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
