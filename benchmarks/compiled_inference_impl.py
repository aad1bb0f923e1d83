"""Compiled inference with each deformable-attention implementation, interleaved in one process.

Compiling for training cannot use ``fused`` (its backward's data-dependent shapes break the graph),
but its forward traces as one graph, so compiled inference keeps it. This times the model's eval
forward compiled twice: with ``reference`` forced (``grid_sample``'s decomposition, what compiled
inference used before) and with the automatic choice (``fused``), and checks both against eager.

    PYTHONPATH=src python benchmarks/compiled_inference_impl.py [--model piip_tsb_368_192_128_cls]
        [--side 368] [--batch 8] [--repeats 3] [--threads 1]

Dense models run ``forward_features`` with the papers' ``linear`` merging.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import piip
from piip.ops.ms_deform_attn import use_impl

VARIANTS = {"reference": lambda: use_impl("reference"), "auto (fused)": contextlib.nullcontext}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="piip_tsb_368_192_128_cls")
    ap.add_argument("--side", type=int, default=368)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cls = args.model.endswith("_cls")
    model = piip.create_model(args.model, img_size=args.side, **({} if cls else {"merge": "linear"})).eval()
    fn = model if cls else model.forward_features
    x = torch.randn(args.batch, 3, args.side, args.side)
    compiled = torch.compile(fn)          # one cache entry per implementation (guarded on the choice)
    with torch.inference_mode():
        eager = fn(x)
        for name, ctx in VARIANTS.items():
            with ctx():
                t = time.perf_counter()
                out = compiled(x)
                print(f"{name}: compile + first pass {time.perf_counter() - t:.1f} s, "
                      f"max |compiled - eager| {float((out - eager).abs().max()):.2e}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for _ in range(args.repeats):
            for name, ctx in VARIANTS.items():
                with ctx():
                    t = time.perf_counter()
                    compiled(x)
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.3f} s (median of {args.repeats}; {[round(a, 3) for a in times[k]]})")
    print(f"auto (fused) / reference: {med['auto (fused)'] / med['reference']:.3f}")


if __name__ == "__main__":
    main()
