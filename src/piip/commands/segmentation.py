"""``piip train segmentation`` and ``piip eval segmentation``."""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..tasks.configs import SegmentorConfig
from ._config_args import add_config_args
from ._model_args import (add_run_args, non_negative_float, non_negative_int, positive_float, positive_int,
                          unit_float)
from ._tasks import check_eval_classes, eval_out_dir
from ._train_common import add_train_model_args, announce_and_fit, check_resume, dense_backbone, task_trainer, train_config


def _add_data_args(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    g = p.add_argument_group("data: --data-root (ADE20K layout) or image + mask folders with --classes")
    g.add_argument("--data-root", default=None,
                   help="ADE20K-layout folder: images/{training,validation}/, annotations/{training,validation}/")
    for split in splits:
        g.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (generic layout)")
        g.add_argument(f"--{split}-masks", default=None, help=f"{split} mask folder: STEM.png per image, class ids, "
                                                               "255 = ignore")
    g.add_argument("--classes", default=None,
                   help="class list: a text file with one name per line, or 'a,b,c' (default with --data-root: "
                        "the 150 ADE20K classes)")
    g.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="mask 0 -> ignore, v -> v-1 (default: on with --data-root, as ADE20K; off otherwise)")


def _dataset(args: argparse.Namespace, split: str, transforms: Any, **kw: Any):
    """The split's dataset, or None when no data was given for it."""
    from ..data.segmentation import ade20k, SegmentationDataset
    images, masks = getattr(args, f"{split}_images", None), getattr(args, f"{split}_masks", None)
    if images or masks:
        if not (images and masks):
            raise ValueError(f"give both --{split}-images and --{split}-masks")
        if not args.classes:
            raise ValueError("the generic layout needs --classes (a file with one class name per line, or 'a,b,c')")
        return SegmentationDataset(images, masks, args.classes, bool(args.reduce_zero_label), transforms, **kw)
    if args.data_root:
        extra = {"class_names": args.classes} if args.classes else {}
        if args.reduce_zero_label is not None:
            extra["reduce_zero_label"] = args.reduce_zero_label
        return ade20k(args.data_root, split, transforms, **extra, **kw)
    return None


def _add_head_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("segmentor (defaults: the model's recipe, see piip.zoo.recipes)")
    g.add_argument("--channels", type=positive_int, default=None,
                   help="UperNet width (default: the model's recipe, 512 for B-sized, 1024 for L-sized models)")
    g.add_argument("--aux-channels", type=positive_int, default=None, help="FCN auxiliary head width (recipes: 256)")
    g.add_argument("--no-aux", action="store_true", help="no auxiliary head")
    add_config_args(g, SegmentorConfig, "segmentor")   # --aux-weight, --dropout
    g.add_argument("--crop-size", type=positive_int, default=None,
                   help="training crop and sliding window (default: the finest branch's resolution)")
    g.add_argument("--slide-stride", type=positive_int, default=None, help="sliding-window stride (default 2/3 crop)")
    g.add_argument("--test-size", type=positive_int, default=None,
                   help="short side of test images before sliding (default: the crop size)")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segmentation", help="train a PIIP UperNet segmentor on ADE20K-style data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_model_args(p, "piip_tsb_896_448_336_seg")
    _add_data_args(p, ("train", "val"))
    _add_head_args(p)
    g = p.add_argument_group("optimisation (defaults: the model's recipe, piip.zoo.recipes.SEG_RECIPES: "
                                 "ViT-Adapter B / L UperNet, vision_spec E.3)")
    g.add_argument("--epochs", type=positive_int, default=127,
                   help="released: 160k iterations at batch 16, i.e. ~127 epochs of ADE20K's 20,210 images")
    g.add_argument("--batch-size", type=positive_int, default=2, help="images per process (released: 8 x 2)")
    g.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (recipes: B 6e-5, L 2e-5)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="(recipes: B 0.01, L 0.05)")
    g.add_argument("--layer-decay", type=unit_float, default=None,
                   help="layer-wise lr decay on ViT blocks (recipes: B 0.95, L 0.9; 1 = off)")
    g.add_argument("--warmup-iters", type=non_negative_int, default=1500)
    g.add_argument("--clip-grad", type=positive_float, default=None)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for GPU, off for CPU)")
    r = add_run_args(p, "runs/segmentation")
    r.add_argument("--eval-mode", default="slide", choices=["slide", "whole"])
    p.set_defaults(func=run_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segmentation", help="mIoU / mAcc / aAcc of a segmentation checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `piip train segmentation`")
    _add_data_args(p, ("val",))
    p.add_argument("--mode", default="slide", choices=["slide", "whole"], help="sliding windows or one pass")
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out-dir", default=None, help="where to write metrics.json (default: next to the checkpoint)")
    p.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from ..data.segmentation import SegTestTransform, SegTrainTransform, segmentation_collate
    from ..engine import init_distributed
    from ..engine.checkpoint import check_writable, seed_everything
    from ..evaluation.segmentation import evaluate_segmentor
    from ..tasks.segmentation import SegmentorConfig, build_segmentor, segmentation_forward

    if not (args.data_root or args.train_images or args.train_masks):
        raise ValueError("give --data-root (ADE20K layout) or --train-images, --train-masks and --classes")
    check_writable(args.output_dir)
    check_resume(args)
    device, _, world = init_distributed(args.device)
    seed_everything(args.seed)
    backbone = dense_backbone(args, "segmentation")
    crop = args.crop_size or int(backbone.cfg.branches[0].img_size)
    stride = int(backbone.cfg.branches[0].max_stride)
    if crop % stride:
        raise ValueError(f"--crop-size {crop} is not a multiple of the finest branch's input stride {stride}")
    dataset = _dataset(args, "train", SegTrainTransform(crop), seed=args.seed)
    from ..zoo.recipes import segmentation_recipe
    recipe = segmentation_recipe(args.model)
    for key in ("channels", "aux_channels", "lr", "weight_decay", "layer_decay"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    seg_cfg = SegmentorConfig(num_classes=dataset.num_classes, channels=args.channels,
                              aux_channels=None if args.no_aux else args.aux_channels, aux_weight=args.aux_weight,
                              dropout=args.dropout, crop_size=args.crop_size, stride=args.slide_stride,
                              test_size=args.test_size, class_names=list(dataset.class_names))
    model = build_segmentor(backbone, dataset.num_classes, seg_cfg)
    if world > 1 and device.type == "cuda":      # released: SyncBN in the heads (same parameter names)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    val_set = _dataset(args, "val", SegTestTransform(model.test_size), on_error="none") if args.eval_every else None
    if val_set is not None and val_set.class_names != dataset.class_names:
        raise ValueError(f"val classes {val_set.class_names[:5]}... differ from train classes {dataset.class_names[:5]}...")

    def epoch_end(m: torch.nn.Module, epoch: int):
        if val_set is None or (epoch % args.eval_every and epoch != args.epochs):
            return None
        return evaluate_segmentor(m, val_set, device, args.eval_mode, args.amp, args.workers,
                                  out_dir=os.path.join(args.output_dir, f"eval_epoch{epoch}"))

    cfg = train_config(args, device, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, layer_decay=args.layer_decay, warmup_iters=args.warmup_iters,
                       warmup_ratio=1e-6, schedule="poly", lr_steps=[], clip_grad=args.clip_grad,
                       find_unused_parameters=False)
    trainer = task_trainer("segmentation", model, dataset, cfg, segmentation_forward, segmentation_collate, args,
                           epoch_end)
    announce_and_fit(trainer, model, args, lambda params: f"training UperNet on {args.model} ({params}) with "
                                                          f"{len(dataset)} images, {dataset.num_classes} classes, "
                                                          f"crop {crop}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data.segmentation import SegTestTransform
    from ..engine import init_distributed
    from ..engine.distributed import cleanup
    from ..evaluation.segmentation import evaluate_segmentor
    from ..tasks.segmentation import load_segmentor

    if not (args.data_root or args.val_images or args.val_masks):
        raise ValueError("give --data-root (ADE20K layout) or --val-images, --val-masks and --classes")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    device, _, _ = init_distributed(args.device)
    model = load_segmentor(args.checkpoint).to(device)
    if args.data_root and not args.classes and model.seg_cfg.class_names:
        args.classes = model.seg_cfg.class_names
    dataset = _dataset(args, "val", SegTestTransform(model.test_size), on_error="none")
    check_eval_classes(model.seg_cfg.class_names, dataset.class_names, model.seg_cfg.num_classes, dataset.num_classes)
    out_dir = eval_out_dir(args)
    evaluate_segmentor(model, dataset, device, args.mode, args.amp, args.workers, out_dir=out_dir)
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}")
    cleanup()
    return 0
