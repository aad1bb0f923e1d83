"""``piip train detection`` and ``piip eval detection``."""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..tasks.configs import DINO_PYRAMID_LEVELS, KINDS, DetectorConfig
from ._config_args import add_config_args, config_args
from ._model_args import (add_model_args, add_run_args, model_overrides, non_negative_float, non_negative_int,
                          positive_float, positive_int, unit_float)
from ._tasks import check_eval_classes, eval_out_dir
from ._train_common import add_train_model_args, announce_and_fit, check_resume, dense_backbone, task_trainer, train_config


def _add_data_args(p: argparse.ArgumentParser, split: str, required: bool) -> None:
    p.add_argument(f"--{split}-ann", required=required, help=f"{split} annotation JSON (COCO format)")
    p.add_argument(f"--{split}-images", required=required, help=f"{split} image folder")


def _coco_paths(args: argparse.Namespace, split: str) -> tuple[str | None, str | None]:
    ann, img = getattr(args, f"{split}_ann", None), getattr(args, f"{split}_images", None)
    if getattr(args, "coco_root", None) and not ann:
        name = {"train": "train2017", "val": "val2017"}[split]
        ann = os.path.join(args.coco_root, "annotations", f"instances_{name}.json")
        img = os.path.join(args.coco_root, name)
    return ann, img


KIND_CHOICES = list(KINDS)   # from the light config module: the parser does not import torchvision


def _add_head_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p.add_argument_group("detector (defaults: released Mask R-CNN 1x)"), DetectorConfig, "detector")
    add_config_args(p.add_argument_group("DINO (--kind dino; defaults: the released DINO 4-scale configs)"),
                    DetectorConfig, "dino")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detection", help="train PIIP Mask R-CNN / Faster R-CNN / RetinaNet on a COCO-format set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_model_args(p, "piip_tsb_1120_896_448")
    p.add_argument("--coco-root", default=None, help="COCO 2017 folder (annotations/, train2017/, val2017/)")
    _add_data_args(p, "train", False)
    _add_data_args(p, "val", False)
    _add_head_args(p)
    g = p.add_argument_group("optimisation (defaults: released recipe)")
    g.add_argument("--schedule", choices=["1x", "2x", "3x"], default=None,
                   help="mmdet step schedule: 12 / 24 / 36 epochs, lr x0.1 at [8, 11] / [16, 22] / [27, 33] "
                        "(default: the model's registered recipe, else 1x); --epochs / --lr-steps override it")
    g.add_argument("--epochs", type=positive_int, default=None, help="default: from --schedule")
    g.add_argument("--batch-size", type=positive_int, default=2, help="images per process")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: the model's released recipe, see piip.zoo.recipes.detection_recipe)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    g.add_argument("--layer-decay", type=unit_float, default=None,
                   help="layer-wise lr decay rate on ViT blocks (default: the model's released recipe, "
                        "see piip.zoo.recipes.detection_recipe; 1 = off)")
    g.add_argument("--warmup-iters", type=non_negative_int, default=500)
    g.add_argument("--lr-steps", type=positive_int, nargs="*", default=None,
                   help="epochs at which lr drops x0.1 (default: from --schedule)")
    g.add_argument("--clip-grad", type=positive_float, default=None,
                   help="max gradient norm (default: the recipe's, 0.1 for DINO, none for the R-CNNs)")
    g.add_argument("--aug", choices=["single", "ms"], default=None,
                   help="training augmentation: 'single' = one scale + flip (released Mask R-CNN), 'ms' = the "
                        "released multi-scale AutoAugment + crop pipeline (default: the model's recipe, else single)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for GPU, off for CPU)")
    r = add_run_args(p, "runs/detection")
    r.add_argument("--no-flip", action="store_true", help="disable random horizontal flip")
    p.set_defaults(func=run_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detection", help="COCO box / mask AP of a detection checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (or a plain state dict + --model)")
    p.add_argument("--coco-root", default=None, help="COCO 2017 folder (uses val2017)")
    _add_data_args(p, "val", False)
    add_model_args(p)
    p.add_argument("--kind", default="mask_rcnn", choices=KIND_CHOICES, help="for a plain state dict only")
    p.add_argument("--num-classes", type=positive_int, default=80, help="for a plain state dict only")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out-dir", default=None, help="where to write detections.json and metrics.json "
                                                    "(default: next to the checkpoint)")
    p.set_defaults(func=run_eval)


def _det_cfg(args: argparse.Namespace, class_names: list[str], recipe: dict[str, Any]) -> DetectorConfig:
    """The head options, an unset one (None) taken from the model's recipe."""
    values = config_args(args, DetectorConfig, "detector", "dino")
    values = {k: recipe.get(k) if v is None else v for k, v in values.items()}
    aug = recipe.get("aug") if args.aug is None else args.aug
    return DetectorConfig(**values, num_classes=len(class_names), class_names=list(class_names), aug=aug or "single")


def _backbone_defaults(kind: str) -> dict[str, Any]:
    """DINO reads pyramid levels 1-3 only: the backbone does not build the stride-4 map."""
    if kind == "dino":
        return {"pyramid_levels": list(DINO_PYRAMID_LEVELS)}
    return {}


def _schedule(args: argparse.Namespace, recipe: dict[str, Any]) -> tuple[int, list[int]]:
    """(epochs, lr steps): explicit --epochs / --lr-steps, else --schedule, else the recipe's, else 1x."""
    from ..zoo.recipes import SCHEDULES
    epochs, steps = SCHEDULES[args.schedule or recipe.get("schedule") or "1x"]
    return (args.epochs or epochs), list(steps if args.lr_steps is None else args.lr_steps)


def run_train(args: argparse.Namespace) -> int:
    from ..data import CocoDetection, detection_collate, detection_ms_transforms, detection_train_transforms
    from ..engine import init_distributed
    from ..engine.checkpoint import check_writable, seed_everything
    from ..evaluation import evaluate_detector
    from ..tasks.detection import MASK_KINDS, build_detector, detection_forward, resolve_sizes
    from ..zoo.recipes import head_recipe

    train_ann, train_img = _coco_paths(args, "train")
    if not train_ann:
        raise ValueError("give --train-ann and --train-images (or --coco-root)")
    val_ann, val_img = _coco_paths(args, "val")
    check_writable(args.output_dir)            # before anything slow: fail now, not after an epoch
    check_resume(args)
    device, _, _ = init_distributed(args.device)
    seed_everything(args.seed)                 # the seed fixes the initial weights too
    backbone = dense_backbone(args, "detection", _backbone_defaults(args.kind))
    probe = CocoDetection(train_ann, train_img, with_masks=False)  # class list before the real dataset
    recipe = head_recipe(args.model, backbone.cfg, args.kind)
    det_cfg = _det_cfg(args, probe.class_names, recipe)
    min_size, max_size, _ = resolve_sizes(backbone.cfg, det_cfg)
    flip = 0.0 if args.no_flip else 0.5
    transforms = (detection_ms_transforms(int(round(backbone.cfg.branches[0].img_size)), flip) if det_cfg.aug == "ms"
                  else detection_train_transforms(min_size, max_size, flip))
    dataset = CocoDetection(train_ann, train_img, transforms, skip_empty=True, with_masks=args.kind in MASK_KINDS,
                            seed=args.seed)
    model = build_detector(backbone, dataset.num_classes, args.kind, det_cfg)
    layer_decay = recipe["layer_decay"] if args.layer_decay is None else args.layer_decay
    lr = recipe["lr"] if args.lr is None else args.lr
    clip_grad = recipe["clip_grad"] if args.clip_grad is None else args.clip_grad
    epochs, lr_steps = _schedule(args, recipe)
    # evaluation reads ground truth (boxes, and masks where they exist) from the annotation file itself
    val_set = CocoDetection(val_ann, val_img, with_masks=False, on_error="none") if val_ann and args.eval_every else None
    if val_set is not None and val_set.class_names != dataset.class_names:
        raise ValueError(f"val categories {val_set.class_names} differ from train categories {dataset.class_names}")

    def epoch_end(m: torch.nn.Module, epoch: int):
        if val_set is None or (epoch % args.eval_every and epoch != epochs):
            return None
        return evaluate_detector(m, val_set, device, args.batch_size, args.workers, args.amp,
                                 out_dir=os.path.join(args.output_dir, f"eval_epoch{epoch}"))

    cfg = train_config(args, device, epochs=epochs, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay,
                       layer_decay=layer_decay, warmup_iters=args.warmup_iters, lr_steps=lr_steps, clip_grad=clip_grad,
                       find_unused_parameters=args.kind in ("retinanet", "dino"))
    trainer = task_trainer("detection", model, dataset, cfg, detection_forward, detection_collate, args, epoch_end)
    announce_and_fit(trainer, model, args, lambda params: f"training {args.kind} on {args.model} ({params}) with "
                                                          f"{len(dataset)} images, {dataset.num_classes} classes")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data import CocoDetection
    from ..engine import init_distributed
    from ..engine.distributed import cleanup
    from ..evaluation import evaluate_detector
    from ..tasks.detection import load_detector

    ann, img = _coco_paths(args, "val")
    if not ann:
        raise ValueError("give --val-ann and --val-images (or --coco-root)")
    device, _, _ = init_distributed(args.device)
    overrides = model_overrides(args)
    model = load_detector(args.checkpoint, args.model, overrides, args.num_classes, args.kind).to(device)
    dataset = CocoDetection(ann, img, with_masks=False, on_error="none")
    check_eval_classes(model.det_cfg.class_names, dataset.class_names, model.det_cfg.num_classes,
                       len(dataset.class_names))
    out_dir = eval_out_dir(args)
    evaluate_detector(model, dataset, device, args.batch_size, args.workers, args.amp, out_dir=out_dir)
    print(f"wrote {os.path.join(out_dir, 'metrics.json')} and detections.json")
    cleanup()
    return 0
