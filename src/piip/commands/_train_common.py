"""Steps every ``piip train TASK`` shares: the dense backbone from the model arguments, and
resuming then fitting."""
from __future__ import annotations

import argparse
from typing import Any, Optional


def check_resume(args: argparse.Namespace) -> None:
    """Refuse a ``--resume`` that names nothing resumable now, before anything is built or written."""
    from ..engine.checkpoint import resume_path
    resume_path(args.resume, args.output_dir)


def dense_backbone(args: argparse.Namespace, task: str, defaults: Optional[dict[str, Any]] = None) -> Any:
    """The ``--model`` backbone with ``--override``/``--img-size``/``--pretrained-branches``; it must
    be a dense model whose finest resolution is a multiple of its input stride. ``defaults`` are
    config overrides the task wants unless ``--override`` sets them."""
    from ..registry import create_model
    from ._model_args import check_img_size, parse_overrides
    overrides = {**(defaults or {}), **parse_overrides(args.override, args.img_size)}
    pretrained = None
    if args.pretrained_branches:
        pretrained = [None if p.lower() == "none" else p for p in args.pretrained_branches]
    backbone = create_model(args.model, pretrained_branches=pretrained, **overrides)
    if backbone.cfg.task != "dense":
        raise ValueError(f"--model {args.model} is a {backbone.cfg.task} model; {task} needs a dense backbone")
    check_img_size(backbone.cfg)
    return backbone


def resume_and_fit(trainer: Any, args: argparse.Namespace) -> None:
    """``--resume PATH`` or ``auto`` (output-dir/checkpoint.pt when it exists), then train."""
    from ..engine.compile import maybe_compile
    from ..engine.distributed import cleanup
    maybe_compile(trainer.model, getattr(args, "compile", False))
    trainer.resume_from(args.resume)
    trainer.fit()
    cleanup()
