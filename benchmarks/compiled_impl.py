"""Compiled steps with each deformable-attention implementation, interleaved in one process.

Compiling selects ``fused`` on CPU, for inference and (since its backward traces too) for
training. This times one of ``latency.py``'s cases (PIIP side only) compiled twice: with
``reference`` forced (``grid_sample``'s decomposition, what compiled inference used before stop 31
and compiled training before stop 32) and with the automatic choice (``fused``). Inference
outputs are checked against eager (training steps return nothing; tests/test_compile.py compares
compiled and eager gradients).

    PYTHONPATH=src python benchmarks/compiled_impl.py [--case cls-eval] [--quick | --side PX] [--repeats 3] [--threads 1]

The default ``cls-eval`` is the classifier's eval forward at batch 8 (``latency.EVAL_BATCH``); ``cls``
is its train step at batch 2, ``dino`` the DINO train step with the backbone compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from latency import CASES, build_model, case_sides, make_step
from piip.export import relative_error
from piip.ops.ms_deform_attn import use_impl

VARIANTS = {"reference": lambda: use_impl("reference"), "auto (fused)": contextlib.nullcontext}
CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="cls-eval", choices=sorted(CASES))
    ap.add_argument("--quick", action="store_true", help="latency.py's reduced input size for the case")
    ap.add_argument("--side", type=int, default=None, help="input side in px (default: the case's, or --quick's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    side = args.side or case_sides(case, args.quick)["piip"]
    model, _ = build_model(case, "piip", side, CPU)
    eager = make_step(case, model, side, CPU)()
    steps = {}
    for name, ctx in VARIANTS.items():
        step = make_step(case, model, side, CPU, compiled={})   # one torch.compile per variant
        with ctx():
            t = time.perf_counter()
            out = step()
            step()                                                # a recompile, if any, happens here
        diff = ("" if eager is None else ", max |compiled - eager| "
                f"{max(float((o - e).abs().max()) for o, e in zip(flat_outputs(out), flat_outputs(eager))):.2e}")
        print(f"{name}: compile + first passes {time.perf_counter() - t:.1f} s{diff}", flush=True)
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
    print(f"{args.case} at {side} px: auto (fused) / reference: {med['auto (fused)'] / med['reference']:.3f}")


def flat_outputs(out) -> list[torch.Tensor]:
    """The step's output tensors (a tensor, or a dict of pyramid levels)."""
    return [out] if isinstance(out, torch.Tensor) else list(out.values())


def max_rel_diff(got, want) -> float:
    """``piip.export.relative_error`` over all of two steps' outputs: max |got - want| / max |want|."""
    return relative_error(*(torch.cat([o.flatten() for o in flat_outputs(x)]) for x in (got, want)))


if __name__ == "__main__":
    main()
