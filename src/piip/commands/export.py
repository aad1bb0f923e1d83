"""``piip export``: a model to ONNX or a torch.export program (.pt2) with dynamic batch / H / W,
checked against eager PyTorch at two other sizes before it is kept."""
from __future__ import annotations

import argparse
import os

from ._model_args import add_model_args, model_overrides, positive_int

FORMATS = ("onnx", "pt2")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or torch.export (.pt2), dynamic batch/height/width",
                       description="Export a registered model (--model, with --override / --img-size) or a trained "
                                   "checkpoint (--checkpoint) to ONNX (torch.onnx.export, dynamo) or a torch.export "
                                   "program. Batch, height and width stay dynamic (multiples of the input stride) "
                                   "unless --static. The written file is run (onnxruntime / torch.export.load) at two "
                                   "other sizes and compared with eager PyTorch before it is kept.")
    add_model_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="piip training checkpoint (classification / segmentation / detection), or weights for --model")
    p.add_argument("--task", default=None,
                   help="what to export when it is ambiguous: 'backbone', 'classification', 'segmentation', ... "
                        "(default: from the checkpoint or the registered model)")
    p.add_argument("--num-classes", type=positive_int, default=150,
                   help="--model with --task segmentation: classes of the (randomly initialised) head")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2 (torch.export.save)")
    p.add_argument("--out", required=True, help="output file; its folder must exist")
    p.add_argument("--example-size", type=positive_int, nargs="+", default=None, metavar="PX",
                   help="H [W] of the example input (default: --img-size or the model's resolution)")
    p.add_argument("--static", action="store_true", help="fixed batch and size (the example's)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--deform-impl", default=None,
                   help="deformable-attention implementation to trace (default: reference = GridSample for ONNX)")
    p.set_defaults(func=run)


def load_for_export(args: argparse.Namespace):  # noqa: ANN201
    """The model the arguments name: a checkpoint (its task read from it) or a registered model."""
    from ..registry import create_model
    overrides = model_overrides(args)
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.checkpoint is not None:
        from ..tasks.registry import TASKS, model_task
        from ..weights.io import read_checkpoint
        task = model_task(read_checkpoint(args.checkpoint, weights_only=True, map_location="cpu"))
        if task in TASKS:
            return TASKS[task].load(args.checkpoint)
        if args.model is None:
            raise ValueError(f"{args.checkpoint} holds no model config; pass the model name (--model) it belongs to")
        return create_model(args.model, checkpoint=args.checkpoint, **overrides)
    if args.model is None:
        raise ValueError("give --model NAME (see 'piip models') or --checkpoint CKPT")
    if args.task == "segmentation":
        from ..tasks.segmentation import build_segmentor
        return build_segmentor(args.model, args.num_classes, **overrides)
    return create_model(args.model, **overrides)


def run(args: argparse.Namespace) -> int:
    from ..export import export_model
    from ..export.core import check_out_path, require_export_deps
    check_out_path(args.out, args.format)          # bad paths and missing extras fail before a model is built
    require_export_deps(args.format)
    if args.example_size is not None and len(args.example_size) > 2:
        raise ValueError(f"--example-size takes H or H W, got {len(args.example_size)} values")
    model = load_for_export(args)
    size = args.example_size if args.example_size is None or len(args.example_size) == 2 else args.example_size[0]
    result = export_model(model, args.format, args.out, size, dynamic=not args.static, opset=args.opset,
                          task=args.task, deform_impl=args.deform_impl)
    print(result.summary())
    return 0
