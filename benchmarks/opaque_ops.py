"""Compiled inference with and without piip's opaque eager ops, against eager, in one process.

``piip.ops.opaque``: a compiled CPU inference graph calls a few eager kernels (position tables
kept between calls, bilinear resizes, the ConvFFN's channels-last depthwise conv, the pyramid's
GEMM upsampling) as opaque custom ops instead of Inductor's code for them. This times, for each
of ``latency.py``'s eval cases and for both models of the pair, the eager forward, the forward
compiled with the ops and compiled without them (``piip.ops.opaque.set_enabled``: Dynamo guards
on the switch, so the two variants are two graphs of one compiled function), interleaved, and
prints the medians, the compile speed-ups (eager / compiled), the PIIP / baseline ratios and the
largest difference of each compiled output from eager.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/opaque_ops.py [--cases tsb-1120-built tsb-1120]
        [--quick] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from compiled_impl import max_rel_diff
from latency import CASES, build_model, case_key, case_sides, make_step
from piip.ops import opaque
from piip.runtime import tune_malloc

CPU = torch.device("cpu")
VARIANTS = ("eager", "compiled, opaque ops", "compiled, Inductor's code")


def _with_ops(step: Callable[[], Any], on: bool) -> Callable[[], Any]:
    def run() -> Any:
        previous = opaque.set_enabled(on)
        try:
            return step()
        finally:
            opaque.set_enabled(previous)
    return run


def measure(case_key: str, quick: bool, repeats: int) -> dict:
    case = CASES[case_key]
    if case.kind not in ("trunk", "as-built", "cls-eval", "seg"):
        raise SystemExit(f"--cases: {case_key} is a training case; this benchmark times inference")
    sides = case_sides(case, quick)
    steps: dict[tuple[str, str], Callable[[], Any]] = {}
    diffs: dict[tuple[str, str], float] = {}
    torch._dynamo.reset()        # a fresh Dynamo state a case (recompile limit; latency.measure_case)
    for w in ("piip", "base"):
        model, _ = build_model(case, w, sides[w], CPU)
        eager = make_step(case, model, sides[w], CPU)
        ref = eager()
        steps[w, VARIANTS[0]] = eager
        compiled = make_step(case, model, sides[w], CPU, compiled={})
        for name, on in ((VARIANTS[1], True), (VARIANTS[2], False)):
            step = _with_ops(compiled, on)
            t = time.perf_counter()
            out = step()
            step()                                       # a recompile, if any, happens here
            diffs[w, name] = max_rel_diff(out, ref)
            print(f"{case_key} {w} {name}: compile + 2 passes {time.perf_counter() - t:.1f} s, "
                  f"max rel diff from eager {diffs[w, name]:.1e}", flush=True)
            steps[w, name] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for i in range(repeats):
        for k in (list(steps) if i % 2 == 0 else list(reversed(steps))):
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(case=case_key, sides=sides, med=med, diffs=diffs)


def report(r: dict) -> str:
    med, diffs = r["med"], r["diffs"]
    eager_p, eager_b = med["piip", VARIANTS[0]], med["base", VARIANTS[0]]
    lines = [f"| {r['case']} | {name} | {med['piip', name]:.3f} | {med['base', name]:.3f} "
             f"| **{med['piip', name] / med['base', name]:.3f}** "
             f"| {eager_p / med['piip', name]:.3f} / {eager_b / med['base', name]:.3f} "
             f"| {diffs.get(('piip', name), 0.0):.1e} / {diffs.get(('base', name), 0.0):.1e} |" for name in VARIANTS]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tsb-1120-built", "tsb-1120"], metavar="CASE", type=case_key)
    ap.add_argument("--quick", action="store_true", help="latency.py's reduced sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    rows = [measure(c, args.quick, args.repeats) for c in args.cases]
    print(f"\n{args.threads} thread(s), median of {args.repeats} interleaved passes"
          f"{', reduced sizes' if args.quick else ''}\n")
    print("| case | variant | PIIP s | base s | **PIIP / base** | speed-up over eager PIIP / base "
          "| max rel diff from eager PIIP / base |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(report(r))


if __name__ == "__main__":
    main()
