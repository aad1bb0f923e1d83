"""bfloat16 autocast against float32 on the CPU, interleaved in one process, one thread by default.

``trunk``: PIIP-TSB 1120/896/448 trunk (``merge='linear'``, ``forward_features``) vs ViTDet-B, eval
forward, at ``--scale`` of the papers' sides (default 0.5: 560 / 512 px). ``cls``: the classifier pair
(PIIP-TSB 368/192/128 vs DeiT-B 224), train step at batch 2. The models and steps are
``latency.py``'s cases ``tsb-1120`` and ``cls``. Prints each model's medians, its bf16 speed-up, and
the PIIP / baseline ratio in both precisions.

    PYTHONPATH=src python benchmarks/bf16_cpu.py trunk cls [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from deform_attn import timed_interleaved
from latency import CASES, _autocast, _side, build_model, make_step

CPU = torch.device("cpu")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def pair(which: str, scale: float) -> dict[tuple[str, str], Callable[[], Any]]:
    """(model name, precision) -> step of both models of the pair."""
    case = CASES["tsb-1120" if which == "trunk" else "cls"]
    sides = ({"piip": _side(case.size, scale), "base": _side(case.base_size, scale)} if which == "trunk"
             else {"piip": case.size, "base": case.base_size})
    steps = {}
    for role, side in sides.items():
        model, _ = build_model(case, role, side, CPU)
        step = make_step(case, model, side, CPU)
        for p, dtype in PRECISIONS.items():
            steps[case.piip if role == "piip" else case.base, p] = _autocast(step, CPU, dtype)
    return steps


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
        med = timed_interleaved(pair(which, args.scale), args.repeats, sync=lambda: None)
        names = list(dict.fromkeys(name for name, _ in med))
        for k in names:
            print(f"{which}: {k}: fp32 {med[k, 'fp32']:.3f} s, bf16 {med[k, 'bf16']:.3f} s, "
                  f"bf16 speed-up {med[k, 'fp32'] / med[k, 'bf16']:.2f}x")
        a, b = names
        print(f"{which}: ratio PIIP / baseline: fp32 {med[a, 'fp32'] / med[b, 'fp32']:.3f}, "
              f"bf16 {med[a, 'bf16'] / med[b, 'bf16']:.3f}")


if __name__ == "__main__":
    main()
