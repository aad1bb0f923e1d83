"""``piip demo``: build a PIIP backbone, run a real photo through it, print what came out."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ._model_args import check_img_size, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a sample photo through a PIIP backbone (random weights)")
    p.add_argument("--model", default="piip_tsb_1120_896_448", help="registered model name")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="finest-branch resolution, a multiple of 16 (default: registered)")
    p.add_argument("--image", default=None, help="image file (default: scikit-image's astronaut photo)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="forward passes to time; with more than 1 the median of the warm passes is also printed")
    p.set_defaults(func=run)


def load_image(path: str | None) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a file, or scikit-image's bundled astronaut photo."""
    if path is None:
        from ..errors import require
        data = require("skimage.data", "the demo photo (or pass --image FILE)")
        return data.astronaut()
    from ..data.images import read_rgb
    return read_rgb(path).permute(1, 2, 0).numpy()


def to_input(img: np.ndarray, size: int) -> torch.Tensor:
    """Resize the long side to ``size`` (keep ratio), normalise (x-127.5)/127.5, pad to multiples of 16."""
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(16, round(h * scale)), max(16, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    x = (x - 127.5) / 127.5
    ph, pw = (-nh) % 16, (-nw) % 16
    return torch.nn.functional.pad(x, (0, pw, 0, ph))


def run(args: argparse.Namespace) -> int:
    from ..registry import create_model, get_config
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"img_size": args.img_size} if args.img_size is not None else {}
    cfg = get_config(args.model, **overrides)
    check_img_size(cfg)
    if cfg.task != "dense":
        raise ValueError(f"demo runs dense backbones; {args.model} is a {cfg.task} model")
    img = load_image(args.image)              # a bad file fails before the model is built
    model = create_model(args.model, **overrides).eval()
    x = to_input(img, round(cfg.img_size))
    params = sum(p.numel() for p in model.parameters())
    print(f"model      {args.model}: branches " + ", ".join(
        f"ViT-{b.embed_dim}d@{round(b.img_size)}px" for b in cfg.branches))
    print(f"image      {img.shape[1]}x{img.shape[0]} RGB -> input {tuple(x.shape)}")
    print(f"parameters {params / 1e6:.1f}M (as built: branches, interactions, merging, pyramid)")
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            feats = model(x)
            times.append(time.perf_counter() - t0)
    for name, f in feats.items():
        stride = x.shape[-1] / f.shape[-1]
        print(f"feature {name}  {tuple(f.shape)}  stride {stride:g}  mean {f.float().mean():+.4f} std {f.float().std():.4f}")
    print(f"time       {times[0]:.2f} s for the first forward pass on {torch.get_num_threads()} CPU thread(s)")
    if len(times) > 1:
        print(f"           {statistics.median(times[1:]):.2f} s median of the {len(times) - 1} following pass(es)")
    return 0
