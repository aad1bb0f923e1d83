"""Steps every ``piip train TASK`` shares: the dense backbone from the model arguments, the run
options of the training config, the trainer (its checkpoints carry the task's model config), and
announcing, resuming then fitting."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from ._model_args import add_model_args, check_img_size, model_overrides


def check_resume(args: argparse.Namespace) -> None:
    """Refuse a ``--resume`` that names nothing resumable now, before anything is built or written."""
    from ..engine.checkpoint import resume_path
    resume_path(args.resume, args.output_dir)


def add_train_model_args(p: argparse.ArgumentParser, default_model: str) -> None:
    """``--model`` and its overrides (:func:`add_model_args`), then ``--pretrained-branches``: the
    model options every ``piip train TASK`` starts with."""
    add_model_args(p, default_model)
    p.add_argument("--pretrained-branches", nargs="+", default=None,
                   help="per-branch weights (files or timm names, finest first; 'none' to skip one)")


def pretrained_branches(args: argparse.Namespace) -> Optional[list[Optional[str]]]:
    """``--pretrained-branches`` with each 'none' as None (that branch keeps its random weights)."""
    if not args.pretrained_branches:
        return None
    return [None if p.lower() == "none" else p for p in args.pretrained_branches]


def dense_backbone(args: argparse.Namespace, task: str, defaults: Optional[dict[str, Any]] = None) -> Any:
    """The ``--model`` backbone with ``--override``/``--img-size``/``--pretrained-branches``; it must
    be a dense model whose finest resolution is a multiple of its input stride. ``defaults`` are
    config overrides the task wants unless ``--override`` sets them."""
    from ..registry import create_model
    overrides = {**(defaults or {}), **model_overrides(args)}
    backbone = create_model(args.model, pretrained_branches=pretrained_branches(args), **overrides)
    if backbone.cfg.task != "dense":
        raise ValueError(f"--model {args.model} is a {backbone.cfg.task} model; {task} needs a dense backbone")
    check_img_size(backbone.cfg)
    return backbone


def train_config(args: argparse.Namespace, device: Any, **task: Any) -> Any:
    """The :class:`~piip.engine.TrainConfig` of the run options (``add_run_args``) + the task's ``task`` fields."""
    from ..engine import TrainConfig
    return TrainConfig(output_dir=args.output_dir, amp=args.amp, workers=args.workers, seed=args.seed,
                       device=str(device), save_every_steps=args.save_every_steps, max_steps=args.max_steps,
                       log_every=args.log_every, strategy=args.strategy, **task)


def task_trainer(task: str, model: Any, dataset: Any, cfg: Any, forward: Callable, collate: Callable,
                 args: argparse.Namespace, epoch_end: Callable, **extra_state: Any) -> Any:
    """The Trainer; every checkpoint stores the model's config (the task table's ``config_dict``, what
    the task's loader rebuilds it from), ``--model`` and ``extra_state``."""
    from ..engine import Trainer
    from ..tasks.registry import TASKS
    state = {"model_config": TASKS[task].config_dict(model), "model_name": args.model, **extra_state}
    return Trainer(model, dataset, cfg, forward, collate, extra_state=state, epoch_end=epoch_end)


def announce_and_fit(trainer: Any, model: Any, args: argparse.Namespace, head: Callable[[str], str]) -> None:
    """Print ``head('N.NM params')`` + where and how long an epoch runs (main process), then
    :func:`resume_and_fit`."""
    from ..engine import is_main
    if is_main():
        n = sum(p.numel() for p in model.parameters())
        print(f"{head(f'{n / 1e6:.1f}M params')}, {trainer.world} process(es) on {trainer.device}; "
              f"{trainer.iters_per_epoch} iterations/epoch; checkpoints in {args.output_dir}")
    resume_and_fit(trainer, args)


def resume_and_fit(trainer: Any, args: argparse.Namespace) -> None:
    """``--resume PATH`` or ``auto`` (output-dir/checkpoint.pt when it exists), then train."""
    from ..engine.compile import maybe_compile
    from ..engine.distributed import cleanup
    maybe_compile(trainer.model, getattr(args, "compile", False))
    trainer.resume_from(args.resume)
    trainer.fit()
    cleanup()
