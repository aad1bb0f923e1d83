"""Where a classifier train step spends its time: PIIP-TSB 368/192/128 vs DeiT-B 224, batch 2.

For each model, one profiled step (``torch.profiler``, self CPU time) split into GEMMs (``mm``,
``addmm``, ``bmm``), attention (``scaled_dot_product*``) and everything else, with the number of op
calls; then, for PIIP, the forward time spent inside the branch blocks and the interaction groups
(forward hooks, median of ``--repeats`` steps; backward = the rest of the step) next to the
interactions' share of ``piip flops``. The models and the step are ``latency.py``'s ``cls`` case.
``--compiled``: the same split of both models' ``torch.compile``d steps (Inductor's generated
kernels count as "other"; the forward hooks are skipped, a compiled graph runs none).

    PYTHONPATH=src python benchmarks/cls_breakdown.py [--threads 1] [--repeats 3] [--compiled]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from latency import CASES, build_model, make_step
from piip.complexity import count

CASE = CASES["cls"]          # latency.py's classifier pair: train step at batch 2
CPU = torch.device("cpu")
GEMM = ("aten::mm", "aten::addmm", "aten::bmm")


def op_split(step) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        kind = "gemm" if e.key in GEMM else "attention" if "scaled_dot_product" in e.key else "other"
        split[kind] += e.self_cpu_time_total / 1e6
        split["calls"] += e.count if e.key.startswith("aten::") else 0
    return split


def forward_parts(model, step, repeats: int) -> dict[str, float]:
    """Median step, forward and backward (the rest of the step) seconds, and the forward seconds
    inside the branch blocks and the interaction groups."""
    acc: dict[str, float] = defaultdict(float)

    def timed(mod, part: str) -> None:
        mod.register_forward_pre_hook(lambda m, i: setattr(m, "_t0", time.perf_counter()))
        mod.register_forward_hook(lambda m, i, o: acc.__setitem__(part, acc[part] + time.perf_counter() - m._t0))
    timed(model, "forward")
    for group in model.backbone.interactions:
        timed(group, "interactions")
    for branch in model.backbone.branches:
        for block in branch.blocks:
            timed(block, "blocks")
    rows = []
    for _ in range(repeats):
        acc.clear()
        t = time.perf_counter()
        step()
        rows.append({"step": time.perf_counter() - t, **acc})
        rows[-1]["backward"] = rows[-1]["step"] - rows[-1]["forward"]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="profile the torch.compile'd steps instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 2 train step")
    steps = {}
    for role, side in (("piip", CASE.size), ("base", CASE.base_size)):
        model, _ = build_model(CASE, role, side, CPU)
        step = make_step(CASE, model, side, CPU, compiled={} if args.compiled else None)
        step()                                             # warm-up (compiles)
        step()
        s = op_split(step)
        total = s["gemm"] + s["attention"] + s["other"]
        name = CASE.piip if role == "piip" else CASE.base
        print(f"{name}{' compiled' if args.compiled else ''}: profiled step {total:.3f} s = GEMMs {s['gemm']:.3f} + attention {s['attention']:.3f} "
              f"+ other {s['other']:.3f} s, {int(s['calls'])} aten op calls")
        steps[role] = (model, step)
    if args.compiled:
        return
    name, side = CASE.piip, CASE.size
    parts = forward_parts(*steps["piip"], args.repeats)
    c = count(name, img_size=[side])
    macs = {m.module: sum(m.flops_by_kind.values()) for m in c.breakdown}
    share = macs["interactions"] / sum(macs.values())
    print(f"{name}: step {parts['step']:.3f} s, forward {parts['forward']:.3f} s (blocks {parts['blocks']:.3f}, interactions "
          f"{parts['interactions']:.3f} = {parts['interactions'] / parts['forward']:.0%}), backward "
          f"{parts['backward']:.3f} s; interactions are {share:.0%} of the counted MACs "
          f"({macs['interactions'] / 1e9:.1f} of {sum(macs.values()) / 1e9:.1f} G a image)")


if __name__ == "__main__":
    main()
