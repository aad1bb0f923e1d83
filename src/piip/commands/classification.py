"""``piip train classification`` and ``piip eval classification``."""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from ._model_args import (add_model_args, add_run_args, check_img_size, model_overrides, non_negative_float, non_negative_int,
                          positive_float, positive_int, unit_float)
from ._tasks import eval_out_dir
from ._train_common import add_train_model_args, announce_and_fit, check_resume, pretrained_branches, task_trainer, train_config

_RECIPE_FLAGS = ["epochs", "batch_size", "lr", "new_lr_scale", "weight_decay", "decay_all", "warmup_epochs",
                 "warmup_lr", "min_lr", "auto_augment", "reprob", "mixup", "cutmix", "smoothing", "ema_decay",
                 "drop_path", "clip_grad"]


def _crop_ratio(text: str) -> float:
    v = unit_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _add_data_args(p: argparse.ArgumentParser, train: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="folder holding train/ and val/ (class = sub-folder)" if train else
                        "folder holding val/ (class = sub-folder), or itself one folder per class")
    if train:
        g.add_argument("--train", default=None, help="training folder or .csv/.json list of path,label "
                                                     "(instead of DATA/train)")
    g.add_argument("--val", default=None, help="validation folder or .csv/.json list (instead of DATA/val)")
    g.add_argument("--crop-ratio", type=_crop_ratio, default=1.0,
                   help="evaluation: resize the short side to size/ratio, centre-crop size (released: 1.0)")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from ..zoo.recipes import CLASSIFICATION_RECIPES as RECIPES
    p = sub.add_parser("classification", help="train a PIIP classifier on an ImageFolder or a path,label list",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Recipe values (--recipe) are defaults; every flag below overrides its value. "
                                   + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    add_train_model_args(p, "piip_tsb_368_192_128_cls")
    p.add_argument("--checkpoint", default=None, help="start from these classifier weights (official or piip)")
    _add_data_args(p, True)
    g = p.add_argument_group("recipe (default values come from --recipe)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="finetune")
    g.add_argument("--epochs", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per process and step")
    g.add_argument("--repeated-aug", type=positive_int, default=1,
                   help="DeiT repeated augmentation: copies of each image per epoch, each augmented anew "
                        "(DeiT from scratch: 3; 1 = off, the released fine-tuning)")
    g.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each batch into this many micro-batches (same result, less memory)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak lr of the pretrained parameters (scratch: per 512 images, scaled by the global batch)")
    g.add_argument("--new-lr-scale", type=positive_float, default=None,
                   help="lr multiplier of the modules PIIP adds to the pretrained branches")
    g.add_argument("--weight-decay", type=non_negative_float, default=None)
    g.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on norms / biases / position tables too")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=None)
    g.add_argument("--warmup-lr", type=positive_float, default=None)
    g.add_argument("--min-lr", type=non_negative_float, default=None, help="cosine floor (absolute)")
    g.add_argument("--auto-augment", default=None, help="timm auto-augment policy, or 'none'")
    g.add_argument("--reprob", type=unit_float, default=None, help="random erasing probability")
    g.add_argument("--crop-scale", type=_crop_ratio, default=0.08,
                   help="smallest area fraction of the random resized crop (released: 0.08)")
    g.add_argument("--mixup", type=non_negative_float, default=None, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=non_negative_float, default=None, help="cutmix alpha (0 = off)")
    g.add_argument("--smoothing", type=unit_float, default=None, help="label smoothing")
    g.add_argument("--ema-decay", type=unit_float, default=None, help="EMA decay of the weights (0 = no EMA)")
    g.add_argument("--drop-path", type=unit_float, default=None, help="drop path of every branch (default: "
                                                                       "the model config's for finetune)")
    g.add_argument("--clip-grad", type=positive_float, default=None, help="max gradient norm")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: on for GPU, off for CPU)")
    g.add_argument("--amp-dtype", choices=["bfloat16", "float16"], default="bfloat16",
                   help="autocast type; float16 adds a dynamic loss scaler (the released fork's fp16 AMP)")
    add_run_args(p, "runs/classification")
    p.set_defaults(func=run_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classification", help="top-1 / top-5 / per-class accuracy of a classifier",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="classification training checkpoint (or official / piip "
                                                       "weights + --model)")
    _add_data_args(p, False)
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out-dir", default=None, help="where to write metrics.json (default: next to the checkpoint)")
    p.set_defaults(func=run_eval)


def _split_path(args: argparse.Namespace, split: str, required: bool) -> Optional[str]:
    explicit = getattr(args, split, None)
    if explicit:
        return explicit
    if args.data:
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data {args.data!r} is not a folder")
        sub = os.path.join(args.data, split)
        if os.path.isdir(sub):
            return sub
        if split == "val" and not hasattr(args, "train"):   # eval: --data may be the class folders themselves
            return args.data
        if required:
            raise ValueError(f"--data {args.data!r} has no {split}/ sub-folder; give --{split} FOLDER_OR_LIST")
        return None
    if required:
        raise ValueError(f"give --data DIR (with {split}/) or --{split} FOLDER_OR_LIST")
    return None


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    from ..zoo.recipes import CLASSIFICATION_RECIPES as RECIPES
    r = dict(RECIPES[args.recipe])
    for k in _RECIPE_FLAGS:
        v = getattr(args, k)
        if v is not None:
            r[k] = v
    if isinstance(r["auto_augment"], str) and r["auto_augment"].lower() in ("none", ""):
        r["auto_augment"] = None
    if r["ema_decay"] == 0:
        r["ema_decay"] = None
    if r["ema_decay"] is not None and r["ema_decay"] >= 1:
        raise ValueError(f"--ema-decay must be below 1, got {r['ema_decay']}")
    return r


def _classifier(args: argparse.Namespace, rc: dict[str, Any], num_classes: int) -> Any:
    """The ``--model`` classifier with ``num_classes`` outputs, the recipe's drop path, ``--override`` /
    ``--img-size`` / ``--pretrained-branches`` and ``--checkpoint`` weights."""
    from ..registry import create_model
    overrides = model_overrides(args)
    overrides["num_classes"] = num_classes
    if rc["drop_path"] is not None:
        br = overrides.setdefault("branches", {})
        if isinstance(br, list):
            for b in br:
                b["drop_path"] = rc["drop_path"]
        else:
            br["drop_path"] = rc["drop_path"]
    model = create_model(args.model, pretrained_branches=pretrained_branches(args), checkpoint=args.checkpoint,
                         **overrides)
    if model.cfg.task != "classification":
        raise ValueError(f"--model {args.model} is a {model.cfg.task} model; use a *_cls model (see `piip models`)")
    check_img_size(model.cfg)
    return model


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..data.classification import ImageClassification, build_transforms, classification_collate
    from ..engine import Trainer, init_distributed, is_main
    from ..engine.checkpoint import check_writable, seed_everything
    from ..tasks.classification_train import NEW_MODULES, NO_DECAY_NAMES, evaluate_classifier, make_loss

    train_src = _split_path(args, "train", True)
    val_src = _split_path(args, "val", False)
    rc = _recipe(args)
    if rc["batch_size"] % args.accum_steps:
        raise ValueError(f"--accum-steps {args.accum_steps} must divide the batch size {rc['batch_size']}")
    check_writable(args.output_dir)
    check_resume(args)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    dataset = ImageClassification(train_src, seed=args.seed)   # classes (and data errors) before the model
    device, _, world = init_distributed(args.device)
    seed_everything(args.seed)
    model = _classifier(args, rc, dataset.num_classes)
    size = int(model.cfg.img_size)
    dataset.transform = build_transforms(size, True, rc["auto_augment"], rc["reprob"], crop_scale=args.crop_scale)
    val_set = None
    if val_src and args.eval_every:
        val_set = ImageClassification(val_src, build_transforms(size, False, crop_ratio=args.crop_ratio),
                                      class_names=dataset.class_names)
    lr = rc["lr"] * (rc["batch_size"] * world / 512 if rc["scale_lr"] else 1.0)
    trainer: Optional[Trainer] = None

    def epoch_end(m: torch.nn.Module, epoch: int):
        if val_set is None or (epoch % args.eval_every and epoch != rc["epochs"]):
            return None
        res = evaluate_classifier(m, val_set, device, rc["batch_size"], args.workers, args.amp,
                                  os.path.join(args.output_dir, f"eval_epoch{epoch}.json"))
        out = {"top1": res["top1"], "top5": res["top5"]}
        if trainer is not None and trainer.ema is not None:
            ema = evaluate_classifier(trainer.ema.module, val_set, device, rc["batch_size"], args.workers, args.amp,
                                      os.path.join(args.output_dir, f"eval_epoch{epoch}_ema.json"))
            out.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        if is_main():
            print(f"epoch {epoch}: val " + " ".join(f"{k} {v:.2f}" for k, v in out.items()))
        return out

    cfg = train_config(args, device, epochs=rc["epochs"], batch_size=rc["batch_size"], lr=lr,
                       weight_decay=rc["weight_decay"], warmup_iters=0, warmup_epochs=rc["warmup_epochs"],
                       warmup_ratio=min(1.0, rc["warmup_lr"] / lr), schedule="cosine", lr_steps=[],
                       min_lr=rc["min_lr"], clip_grad=rc["clip_grad"],
                       lr_scales={NEW_MODULES: rc["new_lr_scale"]} if rc["new_lr_scale"] != 1 else {},
                       decay_all=rc["decay_all"], no_decay=[] if rc["decay_all"] else list(NO_DECAY_NAMES),
                       ema_decay=rc["ema_decay"], accum_steps=args.accum_steps, amp_dtype=args.amp_dtype,
                       repeated_aug=args.repeated_aug)
    trainer = task_trainer("classification", model, dataset, cfg,
                           make_loss(dataset.num_classes, rc["mixup"], rc["cutmix"], rc["smoothing"]),
                           classification_collate, args, epoch_end, class_names=list(dataset.class_names),
                           recipe={"name": args.recipe, **rc})
    announce_and_fit(trainer, model, args, lambda params: f"training {args.model} ({params}, {size} px) with the "
                                                          f"{args.recipe} recipe on {len(dataset)} images, "
                                                          f"{dataset.num_classes} classes")
    if dataset.skipped and is_main():
        print(f"skipped {len(dataset.skipped)} unreadable training image(s)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data.classification import ImageClassification, build_transforms
    from ..engine import init_distributed
    from ..engine.distributed import cleanup
    from ..tasks.classification_train import evaluate_classifier, load_classifier
    from ..weights.io import read_checkpoint

    src = _split_path(args, "val", True)
    device, _, _ = init_distributed(args.device)
    overrides = model_overrides(args)
    model, names = load_classifier(args.checkpoint, args.model, overrides)
    size = int(model.cfg.img_size)
    dataset = ImageClassification(src, build_transforms(size, False, crop_ratio=args.crop_ratio), class_names=names)
    if names is None and dataset.num_classes != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, {src} {dataset.num_classes}")
    out_dir = eval_out_dir(args)
    ck = read_checkpoint(args.checkpoint, weights_only=True, map_location="cpu")
    has_ema = isinstance(ck, dict) and "model_ema" in ck and "model_config" in ck
    del ck
    results = {"model": evaluate_classifier(model.to(device), dataset, device, args.batch_size, args.workers,
                                            args.amp, os.path.join(out_dir, "metrics.json"))}
    if has_ema:
        ema, _ = load_classifier(args.checkpoint, use_ema=True)
        results["ema"] = evaluate_classifier(ema.to(device), dataset, device, args.batch_size, args.workers,
                                             args.amp, os.path.join(out_dir, "metrics_ema.json"))
    for which, r in results.items():
        print(f"{which}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  ({r['images']} images, "
              f"{r['skipped']} unreadable skipped)")
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}" + (" and metrics_ema.json" if has_ema else "")
          + " (per-class accuracy and confusion matrix)")
    cleanup()
    return 0
