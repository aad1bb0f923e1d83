"""Where a PIIP model and its baseline spend a step's time, side by side: by kind of op and by part.

For each ``latency.py`` case (``--cases``), both models run the case's step. After two warm-up steps:

* **by op** -- one step under ``torch.profiler`` (self CPU time) split into GEMMs (linear layers and
  matmuls: ``mkldnn::_linear_pointwise``, ``mm``, ``addmm``, ``bmm``), convolutions, attention
  (``scaled_dot_product_*``), the deformable sampling's gathers (``embedding_bag``, ``grid_sampler``,
  ``index_add``), norms (LayerNorm, GroupNorm), Inductor's generated kernels (``--compiled``) and
  everything else (element-wise passes, copies, the sampling's geometry, Python-side op overhead).
  Next to the GEMM, convolution and attention times: their multiply-adds as ``torch.utils.flop_counter``
  counts them in the same step (CPU attention included: ``torch_count``), so PIIP /
  baseline time can be read against PIIP / baseline work;
* **by part** (eager only: hooks do not run inside compiled graphs) -- wall time of the median of
  ``--repeats`` steps, each part exclusive of the parts inside it: the branches' blocks, the
  interaction groups, the branch merge, the feature pyramid, the rest of the backbone (patch
  embeddings, position tables, the input's resized views), the head (the model's other top-level
  modules: UperNet, DINO's transformer and heads) and the rest of the step ("elsewhere": the loss
  and backward of training steps; for ``trunk`` cases also the backbone's own code, as
  ``forward_features`` runs outside a module call).

The hooks sit on modules whose eager fast paths never check for hooks (blocks, interaction groups,
merge, pyramid, top-level modules), so the timed step runs the same code as an unhooked one.

    PYTHONPATH=src python benchmarks/breakdown.py --cases tsb-1120 tsb-1120-built cls-eval
    PYTHONPATH=src python benchmarks/breakdown.py --cases cls --compiled      # compiled steps, by op only
    PYTHONPATH=src python benchmarks/breakdown.py --cases seg dino --quick    # a quarter of the side

One thread by default; set ``OMP_NUM_THREADS`` to ``--threads`` as for ``latency.py``. The profiler
adds a little time to every op call, most to PIIP's many small ones (seconds to a DINO training
step's ~160k calls), so the by-op split is a profile: the by-part split and ``latency.py`` give
the latencies.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from latency import CASES, Case, build_model, case_key, case_sides, make_step
from piip.backbone import PIIPBackbone
from piip.layers.interaction import InteractionGroup
from piip.layers.merge import BranchMerge
from piip.layers.pyramid import SimpleFeaturePyramid
from torch_count import macs_by_op

CPU = torch.device("cpu")
OP_KINDS = ("GEMMs", "convolutions", "attention", "sampling gathers", "norms", "compiled kernels", "other")
COUNTED = ("GEMMs", "convolutions", "attention")
PARTS = ("blocks", "interactions", "merge", "pyramid", "backbone rest", "head", "elsewhere")


def op_kind(name: str) -> str:
    """The kind of a profiler event (an aten / mkldnn op, or an Inductor kernel) or a counted op."""
    n = name.lower()
    base = n.split("::")[-1].removeprefix("aten.").split(".")[0]     # 'aten::mm' / 'aten.mm.default' -> 'mm'
    if n.startswith("graph_") or "cpp_fused" in n:      # Inductor's kernels (named after what they fuse)
        return "compiled kernels"
    if "linear_pointwise" in n or base in ("mm", "addmm", "bmm", "baddbmm"):
        return "GEMMs"
    if "convolution" in n or "conv2d" in n or "conv_depthwise" in n:
        return "convolutions"
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention"
    if "embedding_bag" in n or "grid_sampler" in n or "index_add" in n:
        return "sampling gathers"
    if "layer_norm" in n or "group_norm" in n:
        return "norms"
    return "other"


def by_op(step: Callable[[], Any]) -> dict[str, float]:
    """Self CPU seconds of one profiled step per op kind, plus 'calls' (aten op calls)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        split[op_kind(e.key)] += e.self_cpu_time_total / 1e6
        split["calls"] += e.count if e.key.startswith("aten::") else 0
    return split


def counted_macs(step: Callable[[], Any]) -> dict[str, float]:
    """Multiply-adds of one eager step per op kind, as ``torch.utils.flop_counter`` counts them."""
    macs: dict[str, float] = defaultdict(float)
    for op, n in macs_by_op(step).items():
        macs[op_kind(op)] += n
    return macs


class PartTimer:
    """Forward wall time per part, exclusive of the labelled parts nested inside (a stack of hooks)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []          # [label, start, time spent in nested labelled parts]
        self.handles: list = []

    def watch(self, mod: nn.Module, label: str) -> None:
        def pre(m: nn.Module, args: Any) -> None:
            self.stack.append([label, time.perf_counter(), 0.0])

        def post(m: nn.Module, args: Any, out: Any) -> None:
            lab, t0, nested = self.stack.pop()
            spent = time.perf_counter() - t0
            self.acc[lab] += spent - nested
            if self.stack:
                self.stack[-1][2] += spent
        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def watch_parts(model: nn.Module, timer: PartTimer) -> None:
    """Label the model's parts: every PIIP backbone's blocks, interactions, merges and pyramid; the
    backbone itself (its exclusive time is the rest); the top-level modules holding no backbone."""
    backbones = [m for m in model.modules() if isinstance(m, PIIPBackbone)]
    for bb in backbones:
        timer.watch(bb, "backbone rest")
        for branch in bb.branches:
            for block in getattr(branch, "blocks", None) or []:
                timer.watch(block, "blocks")
        for m in bb.modules():
            if isinstance(m, InteractionGroup):
                timer.watch(m, "interactions")
            elif isinstance(m, BranchMerge):
                timer.watch(m, "merge")
            elif isinstance(m, SimpleFeaturePyramid):
                timer.watch(m, "pyramid")
    if model not in backbones:
        for child in model.children():
            if not any(m is bb for m in child.modules() for bb in backbones):
                timer.watch(child, "head")


def by_part(model: nn.Module, step: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median step seconds and the median exclusive seconds of each part (eager)."""
    timer = PartTimer()
    watch_parts(model, timer)
    rows = []
    try:
        for _ in range(repeats):
            timer.acc.clear()
            t = time.perf_counter()
            step()
            total = time.perf_counter() - t
            row = {p: timer.acc.get(p, 0.0) for p in PARTS[:-1]}
            row["elsewhere"] = total - sum(row.values())
            row["step"] = total
            rows.append(row)
    finally:
        timer.remove()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def measure(case: Case, quick: bool, compiled: bool, repeats: int,
            overrides: Optional[dict[str, dict]] = None) -> dict[str, dict]:
    """Both models' splits; ``overrides``: per model ('piip' / 'base') config overrides (tests)."""
    sides = case_sides(case, quick)
    out: dict[str, dict] = {}
    for role in ("piip", "base"):
        model, flops = build_model(case, role, sides[role], CPU, **dict((overrides or {}).get(role, {})))
        eager = make_step(case, model, sides[role], CPU)
        macs = counted_macs(eager)
        if compiled:
            torch._dynamo.reset()                         # each model's graph compiled afresh (latency.py)
        step = make_step(case, model, sides[role], CPU, compiled={}) if compiled else eager
        step()                                            # warm-up (compiles)
        step()
        res = {"name": case.piip if role == "piip" else case.base, "side": sides[role], "flops": flops,
               "ops": by_op(step), "macs": macs}
        if not compiled:
            res["parts"] = by_part(model, step, repeats)
        out[role] = res
        del model, step, eager
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "—"


def report(case: Case, res: dict[str, dict], compiled: bool) -> str:
    p, b = res["piip"], res["base"]
    lines = [f"### {case.key}: {p['name']} ({p['side']} px) vs {b['name']} ({b['side']} px), "
             f"{case.step}{', compiled' if compiled else ', eager'}", "",
             f"FLOPs ratio (piip flops): {p['flops'] / b['flops']:.3f}; counted by torch in the step: "
             f"{sum(p['macs'].values()) / sum(b['macs'].values()):.3f}", "",
             "| by op (one profiled step, self CPU) | PIIP s | base s | PIIP / base | share of PIIP | "
             "counted GMAC PIIP / base | counted ratio |",
             "|---|---|---|---|---|---|---|"]
    tp = sum(p["ops"][k] for k in OP_KINDS)
    tb = sum(b["ops"][k] for k in OP_KINDS)
    for k in OP_KINDS:
        if p["ops"][k] == 0 and b["ops"][k] == 0:
            continue
        counted = (f"{p['macs'][k] / 1e9:.1f} / {b['macs'][k] / 1e9:.1f} | {_ratio(p['macs'][k], b['macs'][k])}"
                   if k in COUNTED else "| ")
        lines.append(f"| {k} | {p['ops'][k]:.3f} | {b['ops'][k]:.3f} | {_ratio(p['ops'][k], b['ops'][k])} | "
                     f"{p['ops'][k] / tp:.0%} | {counted} |")
    lines.append(f"| **profiled step** | {tp:.3f} | {tb:.3f} | **{tp / tb:.3f}** | 100% | "
                 f"{sum(p['macs'].values()) / 1e9:.1f} / {sum(b['macs'].values()) / 1e9:.1f} | "
                 f"{_ratio(sum(p['macs'].values()), sum(b['macs'].values()))} |")
    lines.append(f"| aten op calls | {int(p['ops']['calls'])} | {int(b['ops']['calls'])} | | | | |")
    if "parts" in p:
        lines += ["", "| by part (median of steps, exclusive) | PIIP s | base s | PIIP / base | share of PIIP |",
                  "|---|---|---|---|---|"]
        for k in PARTS:
            if p["parts"][k] < 5e-4 and b["parts"][k] < 5e-4:
                continue
            lines.append(f"| {k} | {p['parts'][k]:.3f} | {b['parts'][k]:.3f} | "
                         f"{_ratio(p['parts'][k], b['parts'][k])} | {p['parts'][k] / p['parts']['step']:.0%} |")
        lines.append(f"| **step** | {p['parts']['step']:.3f} | {b['parts']['step']:.3f} | "
                     f"**{p['parts']['step'] / b['parts']['step']:.3f}** | 100% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tsb-1120", "tsb-1120-built", "cls-eval"], metavar="CASE", type=case_key,
                    help=f"latency.py cases ({', '.join(CASES)})")
    ap.add_argument("--quick", action="store_true", help="latency.py's reduced sizes")
    ap.add_argument("--compiled", action="store_true", help="profile the torch.compile'd steps (by op only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="steps whose median gives the by-part split")
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    if args.compiled:
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True     # Inductor's kernels named in the profile
    try:
        import piip.runtime
        piip.runtime.tune_malloc()
    except ImportError:
        pass
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, "
              f"{'compiled (Inductor)' if args.compiled else 'eager'}, {'quick sizes' if args.quick else 'the papers sizes'}")
    print(header, flush=True)
    out = [header, ""]
    for key in args.cases:
        text = report(CASES[key], measure(CASES[key], args.quick, args.compiled, args.repeats), args.compiled)
        print(text, flush=True)
        out.append(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
