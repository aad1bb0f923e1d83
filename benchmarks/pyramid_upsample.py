"""The simple feature pyramid's 2x2 stride-2 transposed convolutions: PyTorch's ConvTranspose2d
(NCHW output, as before) against piip's GEMM + pixel-shuffle ``Upsample2x``, interleaved.

Run: ``PYTHONPATH=src python benchmarks/pyramid_upsample.py [--size 70] [--dim 768] [--repeats 5]``
(70x70x768 is PIIP-TSB 1120's merged map). Prints one table and a summary line.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn

from piip.layers.pyramid import SimpleFeaturePyramid
from piip.runtime import tune_malloc


def conv_transpose_pyramid(p: SimpleFeaturePyramid) -> nn.Module:
    """The same pyramid with stock ConvTranspose2d modules and NCHW-contiguous outputs (the old one)."""
    def stock(up: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
        m = nn.ConvTranspose2d(up.in_channels, up.out_channels, 2, 2)
        m.load_state_dict(up.state_dict())
        return m

    class Stock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fpn1 = nn.Sequential(stock(p.fpn1[0]), p.fpn1[1], p.fpn1[2], stock(p.fpn1[3]))
            self.fpn2 = nn.Sequential(stock(p.fpn2[0]))
            self.fpn4 = p.fpn4

        def forward(self, x):
            return OrderedDict((str(i), f(x).contiguous()) for i, f in
                               enumerate((self.fpn1, self.fpn2, nn.Identity(), self.fpn4)))
    return Stock().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=70)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-tune-malloc", action="store_true")
    args = ap.parse_args()
    tuned = False if args.no_tune_malloc else tune_malloc()
    new = SimpleFeaturePyramid(args.dim).eval()
    models = {"ConvTranspose2d": conv_transpose_pyramid(new), "Upsample2x (GEMM)": new}
    x = torch.randn(1, args.size, args.size, args.dim).permute(0, 3, 1, 2)   # channels-last, as merged
    times = {k: [] for k in models}
    with torch.inference_mode():
        outs = {k: m(x) for k, m in models.items()}   # warm-up + agreement
        diff = max((outs["ConvTranspose2d"][k] - outs["Upsample2x (GEMM)"][k]).abs().max().item() for k in outs["ConvTranspose2d"])
        del outs
        for _ in range(args.repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"pyramid on a {args.dim}x{args.size}x{args.size} map, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, malloc tuned: {tuned}, max abs diff {diff:.2e}")
    for k, t in med.items():
        print(f"{k:20} {t * 1e3:9.1f} ms")
    print(f"summary: Upsample2x pyramid speed-up over ConvTranspose2d: "
          f"{med['ConvTranspose2d'] / med['Upsample2x (GEMM)']:.2f}x")


if __name__ == "__main__":
    main()
