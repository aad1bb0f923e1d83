"""Eval-mode latency of PIIP backbones against their ViTDet baselines, measured on the same run.

Run: ``PYTHONPATH=src python benchmarks/backbone_latency.py [--pairs tsb sbl] [--repeats 3] [--threads N]``.
For each pair and each variant — (a) ``trunk``: ``forward_features`` of the model built with
``merge='linear'`` (what the papers' FLOPs count) vs the ViTDet trunk; (b) ``as-built``: the full
``forward`` (released ``conv`` merging + pyramid) vs ViTDet with its pyramid — the two models run
interleaved (warm-up first, then alternating), the median is reported. FLOPs are counted with
``torch.utils.flop_counter`` on the warm-up pass (matmuls, convolutions, attention; bilinear
sampling and element-wise ops are not counted). Peak memory is the max RSS of a child process
running one forward of that model alone (VmHWM, which — unlike ru_maxrss — restarts at exec). Prints one table and a summary line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from torch_count import counted_macs

import piip
from piip.runtime import tune_malloc

# name, baseline, resolution of the PIIP input, baseline input, papers' FLOPs (G) PIIP / baseline
PAIRS = {
    "tsb": ("piip_tsb_1120_896_448", "vitdet_b_1024", 1120, 1024, 243.0, 463.0),
    "sbl": ("piip_sbl_1344_896_448", "vitdet_l_1024", 1344, 1024, 1002.0, 1542.0),
}
TARGET_TRUNK = {"tsb": 0.60, "sbl": 0.70}


def build(name: str, variant: str) -> torch.nn.Module:
    overrides = {"merge": "linear"} if variant == "trunk" and name.startswith("piip") else {}
    return piip.create_model(name, **overrides).eval()


def runner(model: torch.nn.Module, variant: str):
    return model.forward_features if variant == "trunk" else model


def peak_rss_mb(name: str, variant: str, size: int, threads: int) -> float:
    """Peak RSS (VmHWM) of a fresh process that builds the model and runs one forward (MB)."""
    code = (f"import torch, sys; sys.path.insert(0, {repr(sys.path[0])}); torch.set_num_threads({threads});"
            "from backbone_latency import build, runner;"
            f"m = build({name!r}, {variant!r}); x = torch.randn(1, 3, {size}, {size})\n"
            f"with torch.inference_mode(): runner(m, {variant!r})(x)\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def measure_pair(pair: str, variant: str, repeats: int, threads: int, memory: bool) -> dict:
    name, base, size, base_size, paper_p, paper_b = PAIRS[pair]
    models = {name: build(name, variant), base: build(base, variant)}
    inputs = {name: torch.randn(1, 3, size, size), base: torch.randn(1, 3, base_size, base_size)}
    flops, times = {}, {name: [], base: []}
    with torch.inference_mode():
        for k, m in models.items():  # warm-up doubles as the FLOP count
            flops[k] = counted_macs(lambda: runner(m, variant)(inputs[k])) / 1e9  # the papers' "FLOPs"
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                runner(m, variant)(inputs[k])
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_rss_mb(k, variant, inputs[k].shape[-1], threads) for k in models} if memory else {}
    return dict(pair=pair, variant=variant, piip=name, base=base, t_piip=med[name], t_base=med[base],
                lat_ratio=med[name] / med[base], flops_piip=flops[name], flops_base=flops[base],
                flops_ratio=flops[name] / flops[base], paper_ratio=paper_p / paper_b,
                mem_piip=mem.get(name, float("nan")), mem_base=mem.get(base, float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["tsb", "sbl"], choices=sorted(PAIRS))
    ap.add_argument("--variants", nargs="+", default=["trunk", "as-built"], choices=["trunk", "as-built"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per model (after one warm-up)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="keep glibc's default allocator settings (piip's CLI tunes them, see piip.runtime)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_malloc else tune_malloc()
    rows = []
    print(f"threads {args.threads}, median of {args.repeats}, batch 1, eval mode, float32, "
          f"malloc tuned: {tuned}")
    print(f"{'pair':4} {'variant':8} {'PIIP s':>7} {'ViTDet s':>8} {'lat ratio':>9} {'FLOPs ratio':>11} "
          f"{'paper ratio':>11} {'PIIP GMAC':>9} {'ViTDet GMAC':>11} {'PIIP MB':>8} {'ViTDet MB':>9}")
    for pair in args.pairs:
        for variant in args.variants:
            r = measure_pair(pair, variant, args.repeats, args.threads, not args.no_memory)
            rows.append(r)
            print(f"{pair:4} {variant:8} {r['t_piip']:7.2f} {r['t_base']:8.2f} {r['lat_ratio']:9.3f} "
                  f"{r['flops_ratio']:11.3f} {r['paper_ratio']:11.3f} {r['flops_piip']:9.0f} {r['flops_base']:11.0f} "
                  f"{r['mem_piip']:8.0f} {r['mem_base']:9.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    parts = []
    for r in rows:
        target = TARGET_TRUNK[r["pair"]] if r["variant"] == "trunk" else r["flops_ratio"] + 0.05
        parts.append(f"{r['pair']}/{r['variant']} {r['lat_ratio']:.3f} (target <= {target:.3f}: "
                     f"{'met' if r['lat_ratio'] <= target else 'missed'})")
    print("summary: latency ratio PIIP/ViTDet " + "; ".join(parts))


if __name__ == "__main__":
    main()
