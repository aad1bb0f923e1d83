"""``piip predict IMAGE``: draw a detector's boxes, class names, scores and masks on an image,
colour-code a segmentor's classes, or print a classifier's top-k classes. The checkpoint's task
(:mod:`piip.tasks.registry`) picks which; plain state dicts and ``--pretrained`` are detectors."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from ..tasks.configs import KINDS
from ._model_args import add_model_args, model_overrides, positive_int, unit_float

if TYPE_CHECKING:
    from ..tasks.registry import Task

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
    p.add_argument("--kind", default="mask_rcnn", choices=list(KINDS), help="for a plain state dict only")
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


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed, well-spread colour per class (golden-ratio hues, alternating brightness)."""
    import colorsys
    out = []
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 0.95 if k % 2 == 0 else 0.7)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_segmentation(image: torch.Tensor, pred: torch.Tensor, class_names: list[str], alpha: float = 0.5):
    """PIL picture: the colour-coded prediction blended over ``image`` (uint8 (3, H, W)), with a
    legend of the classes present (most pixels first) on the right."""
    from PIL import Image, ImageDraw
    k = len(class_names)
    colours = torch.tensor(class_colours(k), dtype=torch.float32)
    pred = pred.cpu().long()
    blend = image.permute(1, 2, 0).float() * (1 - alpha) + colours[pred] * alpha
    pic = Image.fromarray(blend.round().clamp(0, 255).to(torch.uint8).numpy())
    counts = torch.bincount(pred.flatten(), minlength=k)
    present = [int(c) for c in counts.argsort(descending=True) if counts[c] > 0]
    row, pad = 14, 4
    names = [f"{class_names[c]} {100 * counts[c].item() / pred.numel():.1f}%" for c in present]
    width = pad * 3 + 12 + max(6 * len(n) for n in names)
    canvas = Image.new("RGB", (pic.width + width, max(pic.height, pad + row * len(present))), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (c, name) in enumerate(zip(present, names)):
        y = pad + i * row
        draw.rectangle([pic.width + pad, y, pic.width + pad + 10, y + 10], fill=class_colours(k)[c], outline=(0, 0, 0))
        draw.text((pic.width + 2 * pad + 12, y - 1), name, fill=(0, 0, 0))
    return canvas, [(class_names[c], counts[c].item() / pred.numel()) for c in present]


_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _predict_segmentation(args: argparse.Namespace, task: Task) -> int:
    """A segmentation checkpoint: the colour-coded classes + legend (detection-only options are unused)."""
    from ..data.images import read_rgb
    from ..engine import init_distributed
    ext = check_picture_out(args.out, _PIL_FORMATS)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    img = read_rgb(args.image)
    device, _, _ = init_distributed(args.device)
    model = task.load(args.checkpoint).eval().to(device)
    h, w = img.shape[-2:]
    pred = task.predict(model, img)
    names = list(model.seg_cfg.class_names) or [str(i) for i in range(model.seg_cfg.num_classes)]
    pic, present = draw_segmentation(img, pred, names)
    os.makedirs(out_dir, exist_ok=True)
    pic.save(args.out, _PIL_FORMATS[ext])
    print(f"segmentation of {args.image} ({w}x{h}) drawn on {args.out}; classes present:")
    for name, frac in present:
        print(f"  {name:24s} {100 * frac:5.1f}%")
    return 0


def _predict_classification(args: argparse.Namespace, task: Task) -> int:
    """A classification checkpoint: the top-k classes and their probabilities."""
    from ..engine import init_distributed
    from ..tasks.classification_train import predict_topk
    device, _, _ = init_distributed(args.device)
    for name, p in predict_topk(args.image, args.checkpoint, args.topk, str(device)):
        print(f"{p:8.4f}  {name}")
    return 0


def _predict_detection(args: argparse.Namespace, task: Task) -> int:
    """A detector (training checkpoint, plain state dict + --model, or --pretrained): boxes, names,
    scores and masks drawn on the image."""
    import torchvision.io

    from ..data.coco import COCO_CLASSES
    from ..data.images import read_rgb
    from ..engine import init_distributed
    from ..tasks.detection import load_detector
    ext = check_picture_out(args.out, _WRITERS)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    img = read_rgb(args.image)                  # before the (slower) model
    device, _, _ = init_distributed(args.device)
    overrides = model_overrides(args)
    if args.pretrained:
        from ..zoo.released import released_detector
        model = released_detector(args.model, **overrides).eval().to(device)
    else:
        model = load_detector(args.checkpoint, args.model, overrides, args.num_classes, args.kind).eval().to(device)
    names = model.det_cfg.class_names or (COCO_CLASSES if model.det_cfg.num_classes == 80 else [])
    h, w = img.shape[-2:]
    out = task.predict(model, img)
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


# how ``piip predict`` shows each task's answer (tasks from piip.tasks.registry.TASKS)
_SHOW: dict[str, Callable[[argparse.Namespace, Task], int]] = {
    "detection": _predict_detection, "segmentation": _predict_segmentation, "classification": _predict_classification}


def run(args: argparse.Namespace) -> int:
    from ..tasks.registry import TASKS, find_task
    if (args.checkpoint is None) == (not args.pretrained):
        raise ValueError("give --checkpoint FILE, or --pretrained with --model NAME (a released Mask R-CNN)")
    if args.pretrained and args.model is None:
        raise ValueError("--pretrained needs --model NAME (e.g. piip_tsb_1120_896_448)")
    task = find_task(args.checkpoint) if args.checkpoint and os.path.isfile(args.checkpoint) else None
    task = task or TASKS["detection"]           # plain state dicts and --pretrained: detectors
    return _SHOW[task.name](args, task)
