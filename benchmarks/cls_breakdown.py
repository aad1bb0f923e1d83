"""Where a classifier train step spends its time: PIIP-TSB 368/192/128 vs DeiT-B 224, batch 2.

For each model, one profiled step (``torch.profiler``, self CPU time) split into GEMMs (``mm``,
``addmm``, ``bmm``), attention (``scaled_dot_product*``) and everything else, with the number of op
calls; then, for PIIP, the forward time spent inside the branch blocks and the interaction groups
(forward hooks, median of ``--repeats`` steps) next to the interactions' share of ``piip flops``.

    PYTHONPATH=src python benchmarks/cls_breakdown.py [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import piip
from piip.complexity import count

PAIR = (("piip_tsb_368_192_128_cls", 368), ("deit_b_224_cls", 224))
GEMM = ("aten::mm", "aten::addmm", "aten::bmm")


def build(name: str, side: int):
    torch.manual_seed(0)
    model = piip.create_model(name, img_size=side).train()
    x, target = torch.randn(2, 3, side, side), torch.softmax(torch.randn(2, 1000), -1)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        torch.sum(-target * torch.log_softmax(out.float(), -1), -1).mean().backward()
        model.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1
    return model, step


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
    """Median forward / backward seconds and forward seconds inside blocks and interaction groups."""
    acc: dict[str, float] = defaultdict(float)

    def timed(mod, part: str) -> None:
        mod.register_forward_pre_hook(lambda m, i: setattr(m, "_t0", time.perf_counter()))
        mod.register_forward_hook(lambda m, i, o: acc.__setitem__(part, acc[part] + time.perf_counter() - m._t0))
    for group in model.backbone.interactions:
        timed(group, "interactions")
    for branch in model.backbone.branches:
        for block in branch.blocks:
            timed(block, "blocks")
    rows = []
    for _ in range(repeats):
        acc.clear()
        f, b = step()
        rows.append({"forward": f, "backward": b, **acc})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 2 train step")
    models = {}
    for name, side in PAIR:
        model, step = build(name, side)
        step()                                             # warm-up
        s = op_split(step)
        total = s["gemm"] + s["attention"] + s["other"]
        print(f"{name}: profiled step {total:.3f} s = GEMMs {s['gemm']:.3f} + attention {s['attention']:.3f} "
              f"+ other {s['other']:.3f} s, {int(s['calls'])} aten op calls")
        models[name] = (model, step, side)
    name = PAIR[0][0]
    model, step, side = models[name]
    parts = forward_parts(model, step, args.repeats)
    c = count(name, img_size=[side])
    macs = {m.module: sum(m.flops_by_kind.values()) for m in c.breakdown}
    share = macs["interactions"] / sum(macs.values())
    print(f"{name}: forward {parts['forward']:.3f} s (blocks {parts['blocks']:.3f}, interactions "
          f"{parts['interactions']:.3f} = {parts['interactions'] / parts['forward']:.0%}), backward "
          f"{parts['backward']:.3f} s; interactions are {share:.0%} of the counted MACs "
          f"({macs['interactions'] / 1e9:.1f} of {sum(macs.values()) / 1e9:.1f} G a image)")


if __name__ == "__main__":
    main()
