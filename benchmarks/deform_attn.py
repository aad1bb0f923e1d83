"""Deformable-attention implementations at the PIIP interaction shapes: forward and forward+backward.

Run: ``PYTHONPATH=src python benchmarks/deform_attn.py [--pairs tsb sbl] [--repeats 5] [--impls ...]``.
Prints one table (median times, ratio of the reference time to each implementation's) and a summary line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from piip.ops import available_impls, ms_deform_attn
from piip.ops.deform_triton import interpreting

# (edge, query tokens, value map (H, W), value width) for batch 1, 16 heads, 4 points, ratio 0.5
SHAPES = {
    "tsb": [("S->T", 70 * 70, (56, 56), 96), ("T->S", 56 * 56, (70, 70), 192),
            ("B->S", 56 * 56, (28, 28), 192), ("S->B", 28 * 28, (56, 56), 384)],
    # PIIP-SBL 1344/896/448: S 84x84 (384-d), B 56x56 (768-d), L 28x28 (1024-d)
    "sbl": [("B->S", 84 * 84, (56, 56), 192), ("S->B", 56 * 56, (84, 84), 384),
            ("L->B", 56 * 56, (28, 28), 384), ("B->L", 28 * 28, (56, 56), 512)],
}
HEADS, POINTS = 16, 4


def make_inputs(lq: int, hw: tuple[int, int], width: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    d = width // HEADS
    value = torch.randn(1, hw[0] * hw[1], HEADS, d, generator=g).to(device).requires_grad_()
    loc = torch.rand(1, lq, HEADS, 1, POINTS, 2, generator=g).to(device).requires_grad_()
    attn = torch.rand(1, lq, HEADS, 1, POINTS, generator=g).softmax(-1).to(device).requires_grad_()
    shapes = torch.tensor([hw], device=device)
    start = torch.zeros(1, dtype=torch.long, device=device)
    return value, shapes, start, loc, attn


def timed(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", nargs="+", default=["tsb", "sbl"], choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=None, help="default: all runnable on this device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    impls = args.impls or [i for i in available_impls() if i != "triton" or dev == "cuda" or interpreting()]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"device {dev}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'model':5} {'edge':5} {'impl':10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10}")
    speedups: dict[str, list[float]] = {i: [] for i in impls}
    for pair in args.pairs:
        for edge, lq, hw, width in SHAPES[pair]:
            inp = make_inputs(lq, hw, width, dev)
            ref = {}
            for impl in ["reference"] + [i for i in impls if i != "reference"]:
                def fwd():
                    with torch.no_grad():
                        ms_deform_attn(*inp, impl=impl)

                def fwd_bwd():
                    ms_deform_attn(*inp, impl=impl).sum().backward()

                tf, tb = timed(fwd, args.repeats, sync), timed(fwd_bwd, args.repeats, sync)
                if impl == "reference":
                    ref = {"f": tf, "b": tb}
                if impl in speedups:
                    speedups[impl].append(ref["b"] / tb)
                print(f"{pair:5} {edge:5} {impl:10} {tf * 1e3:9.1f} {tb * 1e3:11.1f} "
                      f"{ref['f'] / tf:7.2f} {ref['b'] / tb:10.2f}")
    summary = ", ".join(f"{i} {statistics.geometric_mean(v):.2f}x" for i, v in speedups.items() if v)
    print(f"summary: forward+backward speed-up over reference (geometric mean over edges): {summary}")


if __name__ == "__main__":
    main()
