"""``piip predict IMAGE``: draw a detector's boxes, class names, scores and masks on an image, or
print a classifier's top-k classes (classification checkpoints are recognised automatically)."""
from __future__ import annotations

import argparse
import os
from typing import Iterable

import torch

from ._model_args import add_model_args, parse_overrides, positive_int, unit_float

# output formats by file extension (torchvision.io writers)
_WRITERS = {".png": "write_png", ".jpg": "write_jpeg", ".jpeg": "write_jpeg"}


def check_picture_out(path: str, formats: Iterable[str]) -> str:
    """The lower-case extension of ``--out`` if it is one of ``formats`` and its folder can exist."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise ValueError(f"--out {path!r}: unknown picture format {ext or '(no extension)'!r}; use "
                         f"{', '.join(formats)}")
    out_dir = os.path.dirname(os.path.abspath(path))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {path!r}: {out_dir!r} is a file, not a folder")
    return ext


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a trained detector or segmentor on an image and save a picture of the "
                                       "results, or print a classifier's top-k classes")
    p.add_argument("image", help="input image file")
    p.add_argument("--checkpoint", default=None, help="training checkpoint (or a plain state dict + --model)")
    p.add_argument("--pretrained", action="store_true",
                   help="instead of --checkpoint: the released Mask R-CNN of --model from the Hugging Face Hub "
                        "(cached; HF_HUB_OFFLINE=1 reads the cache; needs piip[hub])")
    add_model_args(p)
    p.add_argument("--kind", default="mask_rcnn", choices=["mask_rcnn", "faster_rcnn", "retinanet", "dino", "cascade_mask_rcnn"],
                   help="for a plain state dict only")
    p.add_argument("--num-classes", type=positive_int, default=80,
                   help="for a plain state dict only (80 = COCO names)")
    p.add_argument("--out", default="prediction.png", help="output picture: .png, .jpg or .jpeg")
    p.add_argument("--score-thresh", type=unit_float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--mask-thresh", type=unit_float, default=0.5)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--topk", type=positive_int, default=5, help="classifiers: how many classes to print")
    p.set_defaults(func=run)


def draw_detections(image: torch.Tensor, output: dict[str, torch.Tensor], class_names: list[str],
                    score_thresh: float = 0.5, mask_thresh: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W) picture with masks (translucent), boxes and 'name score' labels."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    keep = output["scores"] >= score_thresh
    boxes, labels, scores = output["boxes"][keep].cpu(), output["labels"][keep].cpu(), output["scores"][keep].cpu()
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    colors = [palette[int(lab) % len(palette)] for lab in labels]
    pic = image
    if "masks" in output and keep.any():
        masks = output["masks"][keep][:, 0].cpu() > mask_thresh
        pic = draw_segmentation_masks(pic, masks, alpha=0.45, colors=colors)
    if len(boxes):
        names = [f"{class_names[int(lab) - 1] if 0 < lab <= len(class_names) else int(lab)} {s:.2f}"
                 for lab, s in zip(labels, scores)]
        pic = draw_bounding_boxes(pic, boxes, labels=names, colors=colors, width=2)
    return pic


def run(args: argparse.Namespace) -> int:
    import torchvision.io

    from ..data.coco import COCO_CLASSES
    from ..data.images import read_rgb
    from ..engine import init_distributed
    from ..tasks.classification_train import is_classification_checkpoint
    from ..tasks.detection import load_detector
    from .segmentation import is_segmentation_checkpoint, run_predict
    if (args.checkpoint is None) == (not args.pretrained):
        raise ValueError("give --checkpoint FILE, or --pretrained with --model NAME (a released Mask R-CNN)")
    if args.pretrained and args.model is None:
        raise ValueError("--pretrained needs --model NAME (e.g. piip_tsb_1120_896_448)")
    if args.checkpoint and os.path.isfile(args.checkpoint) and is_segmentation_checkpoint(args.checkpoint):
        return run_predict(args)   # colour-coded classes + legend (detection-only options are unused)
    if args.checkpoint and os.path.isfile(args.checkpoint) and is_classification_checkpoint(args.checkpoint):
        from .classification import predict_topk
        device, _, _ = init_distributed(args.device)
        for name, p in predict_topk(args.image, args.checkpoint, args.topk, str(device)):
            print(f"{p:8.4f}  {name}")
        return 0
    ext = check_picture_out(args.out, _WRITERS)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    img = read_rgb(args.image)                  # before the (slower) model
    device, _, _ = init_distributed(args.device)
    overrides = parse_overrides(args.override, args.img_size)
    if args.pretrained:
        from ..zoo.released import released_detector
        model = released_detector(args.model, **overrides).eval().to(device)
    else:
        model = load_detector(args.checkpoint, args.model, overrides, args.num_classes, args.kind).eval().to(device)
    names = model.det_cfg.class_names or (COCO_CLASSES if model.det_cfg.num_classes == 80 else [])
    h, w = img.shape[-2:]
    with torch.no_grad():
        out = model([img.float().div(255).to(device)])[0]
    pic = draw_detections(img, out, names, args.score_thresh, args.mask_thresh)
    os.makedirs(out_dir, exist_ok=True)
    getattr(torchvision.io, _WRITERS[ext])(pic, args.out)
    n = int((out["scores"] >= args.score_thresh).sum())
    print(f"{n} detection(s) with score >= {args.score_thresh} drawn on {args.out} ({w}x{h})")
    for lab, s, b in zip(out["labels"], out["scores"], out["boxes"]):
        if s >= args.score_thresh:
            name = names[int(lab) - 1] if 0 < lab <= len(names) else str(int(lab))
            print(f"  {name:16s} {s:.3f}  box {[round(v, 1) for v in b.tolist()]}")
    return 0
