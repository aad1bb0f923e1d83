"""bfloat16 autocast against float32 on the CPU, interleaved in one process, one thread by default.

``trunk``: PIIP-TSB 1120/896/448 trunk (``merge='linear'``, ``forward_features``) vs ViTDet-B, eval
forward, at ``--scale`` of the papers' sides (default 0.5: 560 / 512 px). ``cls``: the classifier pair
(PIIP-TSB 368/192/128 vs DeiT-B 224), train step at batch 2. Prints each model's medians, its bf16
speed-up, and the PIIP / baseline ratio in both precisions.

    PYTHONPATH=src python benchmarks/bf16_cpu.py trunk cls [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch

import piip

PRECISIONS = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


def eval_forward(name: str, side: int, **kw) -> Callable[[], None]:
    torch.manual_seed(0)
    model = piip.create_model(name, img_size=side, **kw).eval()
    x = torch.randn(1, 3, side, side)

    def step() -> None:
        with torch.inference_mode():
            model.forward_features(x)
    return step


def train_step(name: str, side: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = piip.create_model(name, img_size=side).train()
    x, target = torch.randn(2, 3, side, side), torch.softmax(torch.randn(2, 1000), -1)

    def step() -> None:
        loss = torch.sum(-target * torch.log_softmax(model(x).float(), -1), -1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def pair(which: str, scale: float) -> dict[str, Callable[[], None]]:
    if which == "trunk":
        return {"piip_tsb_1120_896_448": eval_forward("piip_tsb_1120_896_448", round(1120 * scale / 32) * 32,
                                                      merge="linear"),
                "vitdet_b_1024": eval_forward("vitdet_b_1024", round(1024 * scale / 32) * 32)}
    return {"piip_tsb_368_192_128_cls": train_step("piip_tsb_368_192_128_cls", 368),
            "deit_b_224_cls": train_step("deit_b_224_cls", 224)}


def measure(fns: dict[str, Callable[[], None]], repeats: int) -> dict[tuple[str, str], float]:
    for fn in fns.values():
        for ctx in PRECISIONS.values():
            with ctx():
                fn()
    times: dict[tuple[str, str], list[float]] = {(k, p): [] for k in fns for p in PRECISIONS}
    for _ in range(repeats):
        for k, fn in fns.items():
            for p, ctx in PRECISIONS.items():
                with ctx():
                    t = time.perf_counter()
                    fn()
                    times[k, p].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", choices=["trunk", "cls"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=float, default=0.5, help="trunk: fraction of the papers' sides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}, interleaved")
    for which in args.pairs:
        fns = pair(which, args.scale)
        med = measure(fns, args.repeats)
        for k in fns:
            print(f"{which}: {k}: fp32 {med[k, 'fp32']:.3f} s, bf16 {med[k, 'bf16']:.3f} s, "
                  f"bf16 speed-up {med[k, 'fp32'] / med[k, 'bf16']:.2f}x")
        a, b = list(fns)
        print(f"{which}: ratio PIIP / baseline: fp32 {med[a, 'fp32'] / med[b, 'fp32']:.3f}, "
              f"bf16 {med[a, 'bf16'] / med[b, 'bf16']:.3f}")


if __name__ == "__main__":
    main()
