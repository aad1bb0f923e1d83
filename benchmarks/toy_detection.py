"""Toy reproduction: tiny 3-branch PIIP vs a single-branch ViT of about the same FLOPs, both as
Mask R-CNN on the synthetic shapes set, same iteration budget, CPU. Reports COCO box / mask AP.

    PYTHONPATH=src python benchmarks/toy_detection.py --iters 120 --out runs/toy_detection

Not a test: takes minutes. Both models start from random weights (no downloads), so layer-wise
lr decay is off (it only makes sense for pretrained branches).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from piip.backbone import PIIPBackbone
from piip.commands.detection import detection_forward
from piip.data import CocoDetection, detection_collate, detection_train_transforms
from piip.data.synthetic import make_coco
from piip.engine import TrainConfig, Trainer
from piip.evaluation import evaluate_detector
from piip.registry import get_config
from piip.tasks.detection import DetectorConfig, build_detector, resolve_sizes


def backbone_gflops(cfg, size: int) -> float:
    model = PIIPBackbone(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops() / 1e9


def piip_config(size: int, depth: int):
    # finest branch smallest: widths 32 / 64 / 128 at resolutions S, 0.8 S, 0.4 S
    per = [{"embed_dim": 32, "num_heads": 2, "depth": depth}, {"embed_dim": 64, "num_heads": 2, "depth": depth},
           {"embed_dim": 128, "num_heads": 4, "depth": depth}]
    return get_config("piip_tsb_1120_896_448", img_size=size, branches=per, deform_num_heads=2)


def vit_config(size: int, depth: int, width: int):
    return get_config("vitdet_b_1024", img_size=size, branches={"embed_dim": width, "num_heads": width // 32,
                                                                "depth": depth,
                                                                "interaction_groups": [[0, depth - 1]]})


def run_one(name, cfg, train_set, val_set, args, heads) -> dict:
    torch.manual_seed(args.seed)
    model = build_detector(cfg, train_set.num_classes, "mask_rcnn", heads)
    iters_per_epoch = math.ceil(len(train_set) / args.batch_size)
    epochs = math.ceil(args.iters / iters_per_epoch)
    tc = TrainConfig(output_dir=os.path.join(args.out, name), epochs=epochs, batch_size=args.batch_size,
                     lr=args.lr, weight_decay=0.05, layer_decay=None, warmup_iters=args.iters // 10,
                     lr_steps=[int(epochs * 8 / 12), int(epochs * 11 / 12)], workers=0, seed=args.seed,
                     device="cpu", max_steps=args.iters, log_every=max(1, args.iters // 10), clip_grad=5.0)
    trainer = Trainer(model, train_set, tc, detection_forward, detection_collate)
    t0 = time.time()
    trainer.fit()
    train_s = time.time() - t0
    metrics = evaluate_detector(model, val_set, "cpu", batch_size=4, verbose=False,
                                out_dir=os.path.join(args.out, name, "eval"))
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "train_s": round(train_s, 1),
            "bbox": metrics["bbox"], "segm": metrics["segm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/toy_detection")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = os.path.join(args.out, "data")
    train_ann = make_coco(data, args.train_images, args.size, max_objects=5, min_object=6, seed=1, split="train")
    val_ann = make_coco(data, args.val_images, args.size, max_objects=5, min_object=6, seed=2, split="val")

    piip = piip_config(args.size, args.depth)
    piip_flops = backbone_gflops(piip, args.size)
    candidates = {w: backbone_gflops(vit_config(args.size, args.depth, w), args.size) for w in (64, 96, 128, 144, 160)}
    width = min(candidates, key=lambda w: abs(candidates[w] - piip_flops))
    vit = vit_config(args.size, args.depth, width)
    # smaller heads and RoI budget than the released config so that the run fits a few CPU minutes
    # min_size = size: the square images are used at the full resolution (the released short-side
    # cap S*800//1333 would shrink them to 60 %)
    heads = DetectorConfig(fpn_channels=64, box_head_dim=128, mask_head_dim=64, roi_batch_size=128,
                           rpn_post_nms_train=500, min_size=args.size)
    results = {}
    for name, cfg, flops in (("piip_3branch", piip, piip_flops), (f"vit_{width}", vit, candidates[width])):
        mn, mx, _ = resolve_sizes(cfg, heads)
        train_set = CocoDetection(train_ann, os.path.join(data, "train"), detection_train_transforms(mn, mx),
                                  skip_empty=True, seed=args.seed)
        val_set = CocoDetection(val_ann, os.path.join(data, "val"), on_error="none")
        print(f"== {name}: backbone {flops:.3f} GFLOPs at {args.size}px")
        results[name] = {"backbone_gflops": round(flops, 4), **run_one(name, cfg, train_set, val_set, args, heads)}
        r = results[name]
        print(f"   box AP {r['bbox']['AP']:.3f} AP50 {r['bbox']['AP50']:.3f} | mask AP {r['segm']['AP']:.3f} "
              f"AP50 {r['segm']['AP50']:.3f} | {r['params_M']:.2f}M params, {r['train_s']}s training")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print("\n| model | backbone GFLOPs | params (M) | box AP | box AP50 | APs | mask AP | mask AP50 | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['backbone_gflops']:.3f} | {r['params_M']:.2f} | {r['bbox']['AP']:.3f} | "
              f"{r['bbox']['AP50']:.3f} | {r['bbox']['APs']:.3f} | {r['segm']['AP']:.3f} | {r['segm']['AP50']:.3f} | "
              f"{r['train_s']} |")


if __name__ == "__main__":
    main()
