"""Compiled inference with each deformable-attention implementation, interleaved in one process.

Compiling for training cannot use ``fused`` (its backward's data-dependent shapes break the graph),
but its forward traces as one graph, so compiled inference keeps it. This times one of
``latency.py``'s inference cases (PIIP side only) compiled twice: with ``reference`` forced
(``grid_sample``'s decomposition, what compiled inference used before) and with the automatic
choice (``fused``), and checks both against eager.

    PYTHONPATH=src python benchmarks/compiled_inference_impl.py [--case cls-eval] [--repeats 3] [--threads 1]

The default ``cls-eval`` is the classifier's eval forward at batch 8 (``latency.EVAL_BATCH``).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from latency import CASES, build_model, make_step
from piip.ops.ms_deform_attn import use_impl

VARIANTS = {"reference": lambda: use_impl("reference"), "auto (fused)": contextlib.nullcontext}
CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="cls-eval", choices=[k for k, c in CASES.items()
                                                          if c.kind in ("trunk", "as-built", "cls-eval", "seg")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    model, _ = build_model(case, "piip", case.size, CPU)
    eager = make_step(case, model, case.size, CPU)()
    steps = {}
    for name, ctx in VARIANTS.items():
        step = make_step(case, model, case.size, CPU, compiled={})   # one torch.compile per variant
        with ctx():
            t = time.perf_counter()
            out = step()
        print(f"{name}: compile + first pass {time.perf_counter() - t:.1f} s, max |compiled - eager| "
              f"{max(float((o - e).abs().max()) for o, e in zip(_flat(out), _flat(eager))):.2e}", flush=True)
        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, ctx in VARIANTS.items():
            with ctx():
                t = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.3f} s (median of {args.repeats}; {[round(a, 3) for a in times[k]]})")
    print(f"auto (fused) / reference: {med['auto (fused)'] / med['reference']:.3f}")


def _flat(out) -> list[torch.Tensor]:
    """The step's output tensors (a tensor, or a dict of pyramid levels)."""
    return [out] if isinstance(out, torch.Tensor) else list(out.values())


if __name__ == "__main__":
    main()
