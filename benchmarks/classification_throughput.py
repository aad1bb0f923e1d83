"""Training throughput (images/s, forward + backward) of PIIP-TSB 368/192/128 against DeiT-B 224,
side by side in one run.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/classification_throughput.py [--batch 8]
[--repeats 3] [--threads N] [--device cpu]``. Both classifiers are built with 1000 classes and
random weights in train mode (drop path on, as in training); one step is forward, soft-target
cross-entropy on random soft labels, and backward (no optimizer step). The two models alternate
after one warm-up step each and the median step time is reported, with the ratio next to the
FLOPs ratio of the papers (17.4 G / 17.6 G per image -> PIIP should run at ~1.01x DeiT-B's rate).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import piip
from piip.runtime import tune_malloc

MODELS = [("piip_tsb_368_192_128_cls", 368, 17.4), ("deit_b_224_cls", 224, 17.6)]


def step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    logits = model(x)
    loss = torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="keep glibc's default allocator settings (piip's CLI tunes them, see piip.runtime)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_malloc else tune_malloc()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    runs = []
    for name, size, gflops in MODELS:
        model = piip.create_model(name).to(dev).train()
        x = torch.randn(args.batch, 3, size, size, device=dev)
        target = torch.softmax(torch.randn(args.batch, 1000, device=dev), -1)
        step(model, x, target)                      # warm-up
        runs.append((name, size, gflops, model, x, target, []))
    for _ in range(args.repeats):
        for name, size, gflops, model, x, target, times in runs:
            t = time.perf_counter()
            step(model, x, target)
            times.append(time.perf_counter() - t)
    print(f"batch {args.batch}, {args.repeats} timed steps each (median), {torch.get_num_threads()} thread(s), {dev}, "
          f"malloc tuned: {tuned}")
    print(f"{'model':28s} {'input':>6s} {'GFLOPs':>7s} {'s/step':>8s} {'img/s':>7s}")
    rates = []
    for name, size, gflops, *_, times in runs:
        med = statistics.median(times)
        rates.append(args.batch / med)
        print(f"{name:28s} {size:6d} {gflops:7.1f} {med:8.2f} {args.batch / med:7.2f}")
    print(f"throughput ratio PIIP / DeiT-B: {rates[0] / rates[1]:.2f} (FLOPs ratio predicts "
          f"{MODELS[1][2] / MODELS[0][2]:.2f})")


if __name__ == "__main__":
    main()
