"""``piip convert official SRC --model NAME --out DST.safetensors``: a checkpoint -> piip safetensors.
``piip convert timm SRC --out DST.safetensors``: a single-branch piip classifier -> timm ViT weights.
``piip convert llava SRC --out DIR``: a released PIIP-LLaVA folder -> a native Hugging Face folder.

``official``: SRC is an official OpenGVLab/PIIP checkpoint (``--model`` names its config) or a piip
training checkpoint (its own config is used; the backbone is written).
``timm``: SRC is a ``piip train classification`` checkpoint of a single-branch ViT (e.g. a
``deit_b_224_cls`` variant); the file holds timm ``VisionTransformer`` keys, readable by timm and by
``pretrained_branches`` like any DeiT file.
"""
from __future__ import annotations

import argparse
import json

from ._model_args import model_overrides, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to piip safetensors")
    p.add_argument("kind", choices=["official", "timm", "llava"],
                   help="'official': an OpenGVLab/PIIP .pth, or a piip training checkpoint (backbone); "
                        "'timm': a single-branch piip classifier checkpoint -> timm ViT weights; 'llava': a "
                        "released PIIP-LLaVA folder -> a native Hugging Face folder (--out DIR)")
    p.add_argument("src", help="checkpoint (.pth / .pt), or for 'llava' the released folder")
    p.add_argument("--model", default=None,
                   help="registered piip model matching the checkpoint's config (not needed for piip training "
                        "checkpoints, which hold their config)")
    p.add_argument("--img-size", type=positive_int, default=None, help="finest-branch resolution override")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE|JSON", help="config override")
    p.add_argument("--out", required=True, help="output .safetensors file ('llava': output folder)")
    p.add_argument("--variant", default=None, help="llava: expected tower (e.g. clip_bl_512_256); read from the weights")
    p.add_argument("--tower-config", default=None, metavar="JSON",
                   help="llava: a PIIPConfig JSON file for a custom (non-released) tower")
    p.add_argument("--heads-out", default=None,
                   help="also write the mmdet neck/heads converted to torchvision MaskRCNN names to this file")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow arbitrary pickled objects (trusted files only)")
    p.add_argument("--ema", action="store_true", help="timm: export the checkpoint's EMA weights")
    p.set_defaults(func=run)


def run_timm(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ..tasks.classification_train import load_classifier
    from ..weights.timm_export import classifier_to_timm, timm_model_kwargs
    model, classes = load_classifier(args.src, args.model, model_overrides(args),
                                     use_ema=args.ema)
    sd = classifier_to_timm(model)
    kwargs = timm_model_kwargs(model.backbone.branches[0], model.num_classes)
    meta = {"format": "pt", "library": "timm", "timm_kwargs": json.dumps(kwargs),
            "class_names": json.dumps(classes or [])}
    save_file({k: v.contiguous() for k, v in sd.items()}, args.out, metadata=meta)
    print(f"wrote {len(sd)} timm ViT tensors to {args.out}; build the model with "
          f"timm.models.vision_transformer.VisionTransformer(**{kwargs})")
    return 0


def check_out_file(path: str, flag: str = "--out") -> None:
    """A writable ``.safetensors`` target, checked before any work (a missing folder is the user's to make)."""
    from ..errors import check_output_file
    if not path.endswith(".safetensors"):
        raise ValueError(f"{flag} must end with .safetensors, got {path!r}")
    check_output_file(path, flag, "model.safetensors")


def run(args: argparse.Namespace) -> int:
    if args.kind == "llava":
        from .llava import run_convert
        return run_convert(args)
    from safetensors.torch import save_file

    from ..config import PIIPConfig
    from ..registry import build_on_meta, get_config
    from ..weights import check_state_dict, convert_mmdet_heads, convert_official_state_dict, fit_config_to_checkpoint
    from ..weights.io import piip_backbone_part, read_checkpoint, unwrap_state_dict
    check_out_file(args.out)
    if args.heads_out is not None:
        if args.kind != "official":
            raise ValueError(f"--heads-out only applies to 'piip convert official', not {args.kind!r}")
        check_out_file(args.heads_out, "--heads-out")
    if args.kind == "timm":
        return run_timm(args)
    overrides = model_overrides(args)   # a malformed override fails before any reading
    raw = read_checkpoint(args.src, weights_only=not args.unsafe_pickle)
    sd = unwrap_state_dict(raw, args.src)
    stored = raw.get("model_config") if isinstance(raw, dict) else None
    if isinstance(stored, dict) and "backbone" in stored and args.model is None:
        cfg = PIIPConfig.from_dict(stored["backbone"])
        name = str(raw.get("model_name") or "piip model")
    elif args.model is None:
        raise ValueError(f"--model is required: {args.src} holds no model config (give the registered name of the "
                         "model the checkpoint was made for, see `piip models`)")
    else:
        cfg, name = get_config(args.model, **overrides), args.model
    body = piip_backbone_part(sd)
    if body is not None and args.heads_out:
        raise ValueError(f"--heads-out: {args.src} is a piip detector checkpoint, whose neck and heads are already "
                         "piip's own (load it whole with `piip eval detection --checkpoint`); drop --heads-out")
    cfg = fit_config_to_checkpoint(cfg, body if body is not None else sd, args.src)  # TSBL: finest width
    model = build_on_meta(cfg)  # names and shapes only: no memory for the weights
    if body is not None:  # piip's own detector / training checkpoint: already our names
        check_state_dict(model, body, args.src)
        ours, extra = body, {}
    else:
        ours, extra = convert_official_state_dict(sd, model, args.src)
    meta = {"format": "pt", "library": "piip", "model": name, "config": json.dumps(cfg.to_dict())}
    save_file({k: v.contiguous() for k, v in ours.items()}, args.out, metadata=meta)
    print(f"wrote {len(ours)} tensors of {name} to {args.out} (its config is in the file's metadata)")
    if extra:
        if args.heads_out:
            heads = convert_mmdet_heads(extra)
            save_file({k: v.contiguous() for k, v in heads.items()}, args.heads_out, metadata={"format": "pt"})
            print(f"wrote {len(heads)} neck/head tensors (torchvision MaskRCNN names) to {args.heads_out}")
        else:
            print(f"skipped {len(extra)} neck/head tensors (use --heads-out to convert them)")
    elif args.heads_out:
        print(f"{args.src} holds no neck/head tensors: nothing written to --heads-out {args.heads_out}")
    return 0

