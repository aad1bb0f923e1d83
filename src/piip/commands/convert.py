"""``piip convert official SRC --model NAME --out DST.safetensors``: official checkpoint -> piip safetensors."""
from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to piip safetensors")
    p.add_argument("kind", choices=["official"], help="source format: 'official' (OpenGVLab/PIIP .pth)")
    p.add_argument("src", help="official checkpoint (.pth)")
    p.add_argument("--model", required=True, help="registered piip model matching the checkpoint's config")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--heads-out", default=None,
                   help="also write the mmdet neck/heads converted to torchvision MaskRCNN names to this file")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow arbitrary pickled objects (trusted files only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from ..registry import build_from_config, get_config
    from ..weights import convert_mmdet_heads, convert_official_state_dict, fit_config_to_checkpoint, read_state_dict
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end with .safetensors, got {args.out!r}")
    sd = read_state_dict(args.src, weights_only=not args.unsafe_pickle)
    cfg = fit_config_to_checkpoint(get_config(args.model), sd, args.src)  # TSBL: finest width from the file
    with torch.device("meta"):  # names and shapes only: no memory for the weights
        model = build_from_config(cfg)
    ours, extra = convert_official_state_dict(sd, model, args.src)
    meta = {"format": "pt", "library": "piip", "model": args.model, "config": json.dumps(cfg.to_dict())}
    save_file({k: v.contiguous() for k, v in ours.items()}, args.out, metadata=meta)
    print(f"wrote {len(ours)} tensors to {args.out} (load: piip.create_model({args.model!r}, checkpoint={args.out!r}))")
    if extra:
        if args.heads_out:
            heads = convert_mmdet_heads(extra)
            save_file({k: v.contiguous() for k, v in heads.items()}, args.heads_out, metadata={"format": "pt"})
            print(f"wrote {len(heads)} neck/head tensors (torchvision MaskRCNN names) to {args.heads_out}")
        else:
            print(f"skipped {len(extra)} neck/head tensors (use --heads-out to convert them)")
    return 0
