"""Deformable-attention implementations at the PIIP interaction shapes: forward and forward+backward.

Run: ``PYTHONPATH=src python benchmarks/deform_attn.py [--pairs tsb sbl cls] [--repeats 5] [--impls ...]
[--compile]``. Prints one table (median times, ratio of the eager reference time to each implementation's,
and which one the automatic choice takes for a training call) and a summary line. ``--compile`` adds
each implementation under ``torch.compile`` (Inductor), forward and forward + backward, as its own rows.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from piip.ops import available_impls, ms_deform_attn
from piip.ops.deform_triton import interpreting
from piip.ops.ms_deform_attn import _select_impl

# (edge, query tokens, value map (H, W), value width) for batch 1, 16 heads, 4 points, ratio 0.5
SHAPES = {
    "tsb": [("S->T", 70 * 70, (56, 56), 96), ("T->S", 56 * 56, (70, 70), 192),
            ("B->S", 56 * 56, (28, 28), 192), ("S->B", 28 * 28, (56, 56), 384)],
    # PIIP-SBL 1344/896/448: S 84x84 (384-d), B 56x56 (768-d), L 28x28 (1024-d)
    "sbl": [("B->S", 84 * 84, (56, 56), 192), ("S->B", 56 * 56, (84, 84), 384),
            ("L->B", 56 * 56, (28, 28), 384), ("B->L", 28 * 28, (56, 56), 512)],
    # the PIIP-TSB 368/192/128 classifier, batch 2 (BATCH): T 23x23, S 12x12, B 8x8
    "cls": [("S->T", 23 * 23, (12, 12), 96), ("T->S", 12 * 12, (23, 23), 192),
            ("B->S", 12 * 12, (8, 8), 192), ("S->B", 8 * 8, (12, 12), 384)],
}
BATCH = {"cls": 2}
HEADS, POINTS = 16, 4


def make_inputs(lq: int, hw, width: int, device: str, heads: int = HEADS, points: int = POINTS,
                dtype: torch.dtype = torch.float32, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Random op inputs (leaves that require grad); ``hw`` is one (H, W) level or a list of levels."""
    levels = [tuple(hw)] if isinstance(hw[0], int) else [tuple(h) for h in hw]
    g = torch.Generator().manual_seed(0)
    d, nl = width // heads, len(levels)
    s = sum(h * w for h, w in levels)
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    value = leaf(torch.randn(batch, s, heads, d, generator=g))
    loc = leaf(torch.rand(batch, lq, heads, nl, points, 2, generator=g))
    attn = leaf(torch.rand(batch, lq, heads, nl, points, generator=g).flatten(-2).softmax(-1).view(batch, lq, heads,
                                                                                                    nl, points))
    starts = [sum(h * w for h, w in levels[:i]) for i in range(nl)]
    return value, tuple(levels), tuple(starts), loc, attn   # level layout as ints: no read-back per call


def timed_interleaved(fns: dict, repeats: int, sync) -> dict:
    """Median time of each callable; one warm-up each, then round-robin so that every
    implementation sees the same machine state (the shared CPU drifts by 2x over minutes)."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _one_impl(impl: str):
    """``ms_deform_attn`` on one implementation, as a plain function torch.compile traces."""
    def run(value, shapes, starts, loc, attn):
        return ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", nargs="+", default=["tsb", "sbl"], choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=None, help="default: all runnable on this device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also run each implementation under torch.compile "
                    "(rows 'IMPL+c'; the warm-up pass compiles)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    impls = args.impls or [i for i in available_impls() if i != "triton" or dev == "cuda" or interpreting()]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"device {dev}, threads {torch.get_num_threads()}, median of {args.repeats}, implementations interleaved")
    print(f"{'model':5} {'edge':5} {'impl':12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10}"
          f"  auto (training)")
    speedups: dict[tuple[str, str], list[float]] = {}
    order = ["reference"] + [i for i in impls if i != "reference"]
    for pair in args.pairs:
        for edge, lq, hw, width in SHAPES[pair]:
            inp = make_inputs(lq, hw, width, dev, batch=BATCH.get(pair, 1))
            runners = {i: functools.partial(ms_deform_attn, impl=i) for i in order}
            if args.compile:
                # fresh static graphs for each shape: one compiled function across all edges would
                # hit dynamo's recompile limit and silently run the later edges eagerly
                torch._dynamo.reset()
                runners.update({f"{i}+c": torch.compile(_one_impl(i), dynamic=False) for i in order})
            auto = _select_impl(None, inp[0], inp[3])

            def fwd(run):
                with torch.no_grad():
                    run(*inp)

            def fwd_bwd(run):
                run(*inp).sum().backward()

            t = timed_interleaved({(i, k): functools.partial(fn, run) for i, run in runners.items()
                                   for k, fn in (("f", fwd), ("b", fwd_bwd))}, args.repeats, sync)
            for impl in runners:
                tf, tb = t[impl, "f"], t[impl, "b"]
                speedups.setdefault((pair, impl), []).append(t["reference", "b"] / tb)
                print(f"{pair:5} {edge:5} {impl:12} {tf * 1e3:9.1f} {tb * 1e3:11.1f} "
                      f"{t['reference', 'f'] / tf:7.2f} {t['reference', 'b'] / tb:10.2f}  {'<-' if impl == auto else ''}")
    summary = ", ".join(f"{impl} {pair.upper()} {statistics.geometric_mean(v):.2f}x"
                        for (pair, impl), v in speedups.items() if impl != "reference")
    print(f"summary: forward+backward speed-up over reference (geometric mean over the edges): {summary}")


if __name__ == "__main__":
    main()
