"""``piip demo``: build a PIIP backbone, run a real photo through it, print what came out and draw it:
a PNG with the input and each pyramid level's features (their first three principal components as
RGB), so the maps can be looked at, not only their shapes."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from ..errors import check_output_file
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
    p.add_argument("--out", default="piip_demo_features.png",
                   help="picture of the input and of each pyramid level's features (.png / .jpg; default: "
                        "piip_demo_features.png in the current folder)")
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


def pca_rgb(feat: torch.Tensor) -> np.ndarray:
    """(C, h, w) features -> (h, w, 3) uint8: the first three principal components over positions,
    each stretched between its 1st and 99th percentile (a common way to look at ViT features)."""
    c, h, w = feat.shape
    x = feat.float().reshape(c, h * w).T
    x = x - x.mean(0, keepdim=True)
    k = min(3, c, h * w)
    _, _, v = torch.linalg.svd(x[:: max(1, x.shape[0] // 4096)], full_matrices=False)  # subsampled rows: fast
    comp = x @ v[:k].T
    lo, hi = torch.quantile(comp, 0.01, dim=0), torch.quantile(comp, 0.99, dim=0)
    comp = ((comp - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    if k < 3:
        comp = torch.cat([comp, comp[:, :1].expand(-1, 3 - k)], 1)
    return (comp.reshape(h, w, 3) * 255).round().to(torch.uint8).numpy()


def draw_features(img: np.ndarray, feats: dict, input_width: int, path: str, tile: int = 256) -> None:
    """One row: the input, then every returned map as PCA colours (nearest-upsampled, ``tile`` px tall)."""
    from PIL import Image, ImageDraw
    tiles = [("input", Image.fromarray(img))]
    tiles += [(f"level {name} (stride {input_width / f.shape[-1]:g})", Image.fromarray(pca_rgb(f[0])))
              for name, f in feats.items()]
    row = [t.resize((max(1, round(t.width * tile / t.height)), tile),
                    Image.BILINEAR if i == 0 else Image.NEAREST) for i, (_, t) in enumerate(tiles)]
    canvas = Image.new("RGB", (sum(t.width for t in row) + 8 * (len(row) - 1), tile + 20), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for (label, _), t in zip(tiles, row):
        canvas.paste(t, (x, 20))
        draw.text((x + 2, 4), label, fill="black")
        x += t.width + 8
    canvas.save(path)


def check_picture_path(path: str) -> None:
    """Before any work: a picture format Pillow writes, in a folder that exists."""
    if os.path.splitext(path)[1].lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"--out {path}: give a .png or .jpg file name")
    check_output_file(path, "--out", "features.png")


def run(args: argparse.Namespace) -> int:
    from ..registry import create_model, get_config
    check_picture_path(args.out)
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
    shown = img if max(img.shape[:2]) <= 1024 else img[:: max(img.shape[:2]) // 512 + 1, :: max(img.shape[:2]) // 512 + 1]
    draw_features(np.ascontiguousarray(shown), feats, x.shape[-1], args.out)
    print(f"picture    {os.path.abspath(args.out)}: the input, then each pyramid level's features "
          "(first 3 principal components as RGB)")
    return 0
