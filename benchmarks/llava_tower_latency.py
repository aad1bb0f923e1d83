"""Latency of the PIIP-LLaVA vision tower against LLaVA-1.5's single CLIP-L/14 @336 tower, side by side.

Run: ``PYTHONPATH=src python benchmarks/llava_tower_latency.py [--tower piip_llava_clip_bl_512_256]
[--device cpu|cuda] [--dtype fp32|bf16] [--batch 1] [--repeats 5] [--threads N]``.

Both towers are piip models with random weights (latency does not depend on them) running
``forward_branches`` (what PIIP-LLaVA's projector reads) in eval mode; they run interleaved after a
warm-up and the median is reported. The papers count 193G (PIIP CLIP-BL 512/256) vs 191G (CLIP-L
336) vision-encoder FLOPs (``piip flops``), so the latency ratio should be near 1. FLOPs here are
``torch.utils.flop_counter`` multiply-adds of the warm-up pass (matmuls and convolutions incl. the
attention products; deformable sampling and element-wise ops are not counted). On CUDA the peak
allocated memory of each tower's forward is reported too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_count import counted_macs

import piip
from piip.complexity import count

BASELINE = "llava15_clip_l_336"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(names: list[str], device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> list[dict]:
    models = {n: piip.create_model(n).eval().requires_grad_(False).to(device, dtype) for n in names}
    inputs = {n: torch.randn(batch, 3, int(m.cfg.img_size), int(m.cfg.img_size), device=device, dtype=dtype)
              for n, m in models.items()}
    flops, mem, times = {}, {}, {n: [] for n in names}
    with torch.inference_mode():
        for n, m in models.items():   # warm-up doubles as the FLOP count (and the peak-memory pass)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            flops[n] = counted_macs(lambda: m.forward_branches(inputs[n])) / 1e9 / batch
            _sync(device)
            if device.type == "cuda":
                mem[n] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        for _ in range(repeats):
            for n, m in models.items():
                _sync(device)
                t = time.perf_counter()
                m.forward_branches(inputs[n])
                _sync(device)
                times[n].append(time.perf_counter() - t)
    return [{"model": n, "res": "/".join(f"{r:g}" for r in models[n].branch_resolutions),
             "t": statistics.median(times[n]), "gmac": flops[n], "paper": count(n).flops / 1e9,
             "mem": mem.get(n, float("nan"))} for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", nargs="+", default=["piip_llava_clip_bl_512_256"],
                    help="PIIP-LLaVA towers to time against the CLIP-L 336 baseline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per tower (after one warm-up)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = measure([BASELINE] + list(args.tower), device, dtype, args.batch, args.repeats)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
          f"{args.dtype}, batch {args.batch}, median of {args.repeats}")
    print(f"{'tower':40} {'resolution':>10} {'s/batch':>8} {'ratio':>6} {'GMAC/img':>9} {'paper G':>8} {'peak MB':>8}")
    t0 = rows[0]["t"]
    for r in rows:
        mem = f"{r['mem']:8.0f}" if r["mem"] == r["mem"] else f"{'-':>8}"   # measured on CUDA only
        print(f"{r['model']:40} {r['res']:>10} {r['t']:8.3f} {r['t'] / t0:6.2f} {r['gmac']:9.1f} {r['paper']:8.1f} "
              f"{mem}")


if __name__ == "__main__":
    main()
