"""oneDNN linears with fused epilogues (``piip.ops.linear``) against the stock ``F.linear`` path,
eager CPU inference, both sides of a latency pair, interleaved in one run.

For each ``latency.py`` case (eval forwards only), the PIIP model and its baseline each run with
the oneDNN path on and off (``piip.ops.linear.set_enabled``), round-robin, median of ``--repeats``;
printed: the four times, each model's speed-up, and the PIIP / baseline ratio with and without it.
``--compiled``: the same under ``torch.compile`` (the switch is read while tracing, so each setting
gets its own graph, compiled during the warm-up pass).
``--tuned`` adds a third setting, the path with ``set_tuning(True)`` (each call shape timed on oneDNN
and on MKL once, during the warm-up pass, then the faster kept).
``--gemms`` first times single GEMM shapes of the ViT-T/S/B branches and ViTDet-B (MKL ``F.linear``
against oneDNN, plain and with the GELU / residual-add epilogue).

    PYTHONPATH=src python benchmarks/onednn_linear.py [--cases tsb-1120 tsb-1120-built cls-eval]
        [--threads 1] [--repeats 3] [--quick] [--gemms] [--compiled] [--tuned]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from deform_attn import timed_interleaved
from latency import CASES, build_model, case_sides, make_step
from piip.ops import linear as onednn
from piip.runtime import tune_malloc

CPU = torch.device("cpu")
# (rows, in, out): tokens of one image at the papers' sizes
GEMMS = {"ViT-T qkv (1120)": (4900, 192, 576), "ViT-T fc1": (4900, 192, 768), "ViT-T fc2": (4900, 768, 192),
         "ViT-S qkv (896)": (3136, 384, 1152), "ViT-S fc1": (3136, 384, 1536), "ViT-S fc2": (3136, 1536, 384),
         "ViT-B fc1 (448)": (784, 768, 3072), "ViT-B fc2": (784, 3072, 768),
         "ViTDet-B fc1 (1024)": (4096, 768, 3072), "ViTDet-B fc2": (4096, 3072, 768)}


def gemm_table(repeats: int) -> None:
    print("| shape | rows x in x out | MKL ms | oneDNN ms | MKL + GELU ms | fused GELU ms | MKL + add ms | fused add ms |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (m, k, n) in GEMMS.items():
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
        res = torch.randn(m, n, generator=g)
        t = timed_interleaved({
            "mkl": lambda: F.linear(x, w, b), "dnnl": lambda: onednn.linear(x, w, b),
            "mkl_gelu": lambda: F.gelu(F.linear(x, w, b)), "dnnl_gelu": lambda: onednn.linear(x, w, b, act="gelu"),
            "mkl_add": lambda: res + F.linear(x, w, b), "dnnl_add": lambda: onednn.linear(x, w, b, residual=res),
        }, repeats, lambda: None)
        print(f"| {name} | {m}x{k}x{n} | " + " | ".join(f"{t[k_] * 1e3:.1f}" for k_ in t) + " |")


def switched(step, set_enabled, flag: bool):
    """``step`` run with a process-wide switch (``set_enabled(flag) -> previous``) set, then restored."""
    def run():
        previous = set_enabled(flag)
        try:
            return step()
        finally:
            set_enabled(previous)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["tsb-1120", "tsb-1120-built", "cls-eval"],
                    help="latency.py eval cases (none: only --gemms)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="latency.py's reduced sizes")
    ap.add_argument("--gemms", action="store_true", help="time single GEMM shapes first")
    ap.add_argument("--compiled", action="store_true",
                    help="the models under torch.compile (Inductor): piip::onednn_linear against Inductor's own GEMMs")
    ap.add_argument("--tuned", action="store_true",
                    help="also the oneDNN path with per-shape engine tuning (piip.ops.linear.set_tuning)")
    args = ap.parse_args()
    eval_cases = [k for k, c in CASES.items() if c.kind in ("trunk", "as-built", "cls-eval", "seg")]
    bad = [c for c in args.cases if c not in eval_cases]
    if bad:
        ap.error(f"--cases: {bad} are not eval-forward cases of latency.py; pick from {eval_cases}")
    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), float32, "
          f"{'compiled (inductor)' if args.compiled else 'eager'}, "
          f"median of {args.repeats} interleaved passes, malloc tuned: {tuned}, oneDNN op built in: {onednn.enabled()}")
    if not onednn.enabled():
        print("this torch build has no oneDNN linear op: nothing to compare")
        return
    if args.gemms:
        gemm_table(args.repeats)
    if not args.cases:
        return
    extra = " PIIP tuned s | base tuned s | ratio tuned |" if args.tuned else ""
    print("| case | PIIP stock s | PIIP oneDNN s | speed-up | base stock s | base oneDNN s | speed-up | ratio stock | "
          "ratio oneDNN |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * (3 if args.tuned else 0))
    for key in args.cases:
        case = CASES[key]
        sides = case_sides(case, args.quick)
        steps = {}
        torch._dynamo.reset()    # a fresh Dynamo state a case (recompile limit; latency.measure_case)
        for role in ("piip", "base"):
            model, _ = build_model(case, role, sides[role], CPU)
            step = make_step(case, model, sides[role], CPU, compiled={} if args.compiled else None)
            steps[f"{role}_stock"], steps[f"{role}_dnnl"] = (switched(step, onednn.set_enabled, False),
                                                             switched(step, onednn.set_enabled, True))
            if args.tuned:
                steps[f"{role}_tuned"] = switched(switched(step, onednn.set_tuning, True), onednn.set_enabled, True)
        t = timed_interleaved(steps, args.repeats, lambda: None)
        print(f"| {key} | {t['piip_stock']:.3f} | {t['piip_dnnl']:.3f} | {t['piip_stock'] / t['piip_dnnl']:.3f}x "
              f"| {t['base_stock']:.3f} | {t['base_dnnl']:.3f} | {t['base_stock'] / t['base_dnnl']:.3f}x "
              f"| {t['piip_stock'] / t['base_stock']:.3f} | {t['piip_dnnl'] / t['base_dnnl']:.3f} |"
              + (f" {t['piip_tuned']:.3f} | {t['base_tuned']:.3f} | {t['piip_tuned'] / t['base_tuned']:.3f} |"
                 if args.tuned else ""), flush=True)


if __name__ == "__main__":
    main()
