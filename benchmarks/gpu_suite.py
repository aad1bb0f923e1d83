"""The GPU checks in one prepared run (<= 5 minutes on an H100): run it the moment a GPU is lent.

    PYTHONPATH=src python benchmarks/gpu_suite.py --out $OUT [--docs]
    PYTHONPATH=src python benchmarks/gpu_suite.py --dry-run --out /tmp/x   # same code paths, CPU, tiny sizes

(a) ``triton`` deformable attention against ``reference`` on CUDA: forward output and the value /
    location / attention-weight gradients, float32 and bfloat16, at the DINO encoder and decoder
    shapes (COCO 800x1333, 4 levels, 8 heads x 32) and the PIIP-TSB interaction edges (1120 px,
    16 heads); (b) their forward and forward+backward time against ``reference`` and ``fused``
    (interleaved, median); (c) PIIP-TSB 1120/896/448 vs ViTDet-B 1024 as built: eval latency and a
    training step (forward + backward) with peak memory, bfloat16 autocast, eager and compiled
    (``benchmarks/latency.py``'s measurement); (d) the same pair's eval forward under other schedules:
    PIIP's branches on their own CUDA streams (``benchmarks/branch_concurrency.py``), each model
    replayed as one captured CUDA graph (a fixed input size), and both. Results go to ``gpu_suite.json`` and ``gpu_suite.md``
    in ``--out`` after every section (a timeout keeps what finished); ``--docs`` regenerates the block in
    docs/performance.md. Without CUDA it prints one line and exits 0. ``--dry-run`` runs everything
    on CPU at tiny sizes with Triton's interpreter (what the test-suite checks).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BEGIN, END = "<!-- gpu_suite.py:begin -->", "<!-- gpu_suite.py:end -->"
# name -> (queries, levels (H, W), heads, value width); DINO: COCO 800x1333 at strides 8..64, 900 queries
DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SHAPES: dict[str, tuple[int, list[tuple[int, int]], int, int]] = {
    "DINO encoder": (sum(h * w for h, w in DINO_LEVELS), DINO_LEVELS, 8, 256),
    "DINO decoder": (900, DINO_LEVELS, 8, 256),
    "TSB S->T": (70 * 70, [(56, 56)], 16, 96),
    "TSB T->S": (56 * 56, [(70, 70)], 16, 192),
    "TSB B->S": (56 * 56, [(28, 28)], 16, 192),
    "TSB S->B": (28 * 28, [(56, 56)], 16, 384),
}
# max |diff| / max |reference| allowed; in bf16 the reference runs in float32 on the same (bf16) inputs,
# as the deformable layer calls the op (triton computes in float32 and rounds its output to bf16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _tiny(shape: tuple[int, list[tuple[int, int]], int, int]) -> tuple[int, list[tuple[int, int]], int, int]:
    """Dry-run version of a shape: maps and queries shrunk, 2 heads of width 4."""
    lq, levels, _, _ = shape
    return min(lq, 24), [(max(2, h // 16), max(2, w // 16)) for h, w in levels], 2, 8


def _run_op(inputs: tuple, impl: str, backward: bool) -> tuple[torch.Tensor, ...]:
    from piip.ops import ms_deform_attn
    value, shapes, start, loc, attn = inputs
    out = ms_deform_attn(value, shapes, start, loc, attn, impl=impl)
    if not backward:
        return (out.detach(),)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gv, gl, ga = torch.autograd.grad(out, (value, loc, attn), grad)
    return out.detach(), gv, gl, ga


def check_triton(shapes: dict, device: str, dtypes: list[torch.dtype]) -> list[dict]:
    """(a): relative max error of triton's output and gradients against reference."""
    from deform_attn import make_inputs
    rows = []
    for name, (lq, levels, heads, width) in shapes.items():
        for dt in dtypes:
            inp = make_inputs(lq, levels, width, device, heads=heads, dtype=dt)
            inp32 = tuple(t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inp)
            ref = _run_op(inp32, "reference", True)
            tri = _run_op(inp, "triton", True)
            errs = {}
            for label, a, b in zip(("out", "grad value", "grad loc", "grad attn"), tri, ref):
                scale = b.float().abs().max().clamp_min(1e-12)
                errs[label] = float((a.float() - b.float()).abs().max() / scale)
            rows.append({"shape": name, "dtype": str(dt).replace("torch.", ""), "queries": lq, "levels": levels,
                         "heads": heads, "width": width, "rel_err": errs, "tol": TOL[dt],
                         "ok": all(e <= TOL[dt] for e in errs.values())})
            print(f"(a) {name:13s} {rows[-1]['dtype']:8s} " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                  + f" -> {'ok' if rows[-1]['ok'] else 'MISMATCH'}", flush=True)
    return rows


def time_impls(shapes: dict, device: str, impls: list[str], repeats: int) -> list[dict]:
    """(b): median forward and forward+backward time of each implementation, interleaved."""
    from deform_attn import make_inputs, timed_interleaved
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, (lq, levels, heads, width) in shapes.items():
        inp = make_inputs(lq, levels, width, device, heads=heads)
        fns: dict[tuple[str, str], Callable[[], Any]] = {}
        for impl in impls:
            fns[impl, "fwd"] = lambda impl=impl: _run_op(inp, impl, False)
            fns[impl, "fwd+bwd"] = lambda impl=impl: _run_op(inp, impl, True)
        t = timed_interleaved(fns, repeats, sync)
        for impl in impls:
            rows.append({"shape": name, "impl": impl, "fwd_ms": t[impl, "fwd"] * 1e3,
                         "fwd_bwd_ms": t[impl, "fwd+bwd"] * 1e3,
                         "fwd_speedup": t["reference", "fwd"] / t[impl, "fwd"],
                         "fwd_bwd_speedup": t["reference", "fwd+bwd"] / t[impl, "fwd+bwd"]})
            r = rows[-1]
            print(f"(b) {name:13s} {impl:9s} fwd {r['fwd_ms']:8.2f} ms (x{r['fwd_speedup']:.2f})  "
                  f"fwd+bwd {r['fwd_bwd_ms']:8.2f} ms (x{r['fwd_bwd_speedup']:.2f})", flush=True)
    return rows


def _pair_case(key: str, dry_run: bool) -> tuple[Any, Optional[dict]]:
    """``latency.py``'s case ``key`` and its model overrides: in the dry run 2-block, 32-wide
    branches at 64 px (the same code path in seconds)."""
    import dataclasses

    import latency
    case = latency.CASES[key]
    if not dry_run:
        return case, None
    over = {"piip": {"branches": [{"embed_dim": 32 * (i + 1), "num_heads": 2, "depth": 2} for i in range(3)],
                     "deform_num_heads": 2},
            "base": {"branches": [{"embed_dim": 32, "num_heads": 2, "depth": 2}]}}
    return dataclasses.replace(case, quick_scale=1 / 16), over


def model_pairs(device: str, dry_run: bool, repeats: int, compile_: Optional[dict]) -> list[dict]:
    """(c): PIIP-TSB vs ViTDet-B as built, eval and training step, bf16 autocast, eager and compiled."""
    import latency
    rows = []
    for key in ("tsb-1120-built", "tsb-1120-train"):
        case, over = _pair_case(key, dry_run)
        r = latency.measure_case(case, dry_run, repeats, torch.device(device), compile_, overrides=over,
                                 autocast=torch.bfloat16)
        r.pop("times", None)
        rows.append(r)
        print(f"(c) {key}: eager ratio {r['eager_ratio']:.3f}, compiled ratio {latency._f(r.get('compiled_ratio'))},"
              f" FLOPs ratio {r['flops_ratio']:.3f}, peak MiB {r['peak_mib']}, compile errors {r['compile_errors']}",
              flush=True)
    return rows


def cuda_graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` (no arguments, fixed inputs) captured once as a CUDA graph; the returned callable
    replays it and returns the captured outputs (overwritten by every replay). Warm-up runs on a
    side stream first, as capture requires (lazy initialisations, the kept derived weights)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out
    return replay


def schedules(device: str, dry_run: bool, repeats: int) -> dict:
    """(d): the as-built pair's eval forward (batch 1, bf16 autocast) under other schedules: PIIP's
    branches on CUDA streams, each model as one CUDA graph, PIIP with both; interleaved medians,
    each variant's largest difference from its model's eager output."""
    import branch_concurrency
    import latency
    from compiled_impl import max_rel_diff
    from deform_attn import timed_interleaved
    case, over = _pair_case("tsb-1120-built", dry_run)
    over = over or {}
    dev = torch.device(device)
    sides = latency.case_sides(case, dry_run)
    models = {w: latency.build_model(case, w, sides[w], dev, **dict(over.get(w, {})))[0].eval() for w in sides}
    g = torch.Generator().manual_seed(0)
    inputs = {w: torch.randn(1, 3, s, s, generator=g).to(dev) for w, s in sides.items()}

    def forward(w: str) -> Callable[[], Any]:
        def run() -> Any:   # the autocast cache is off: a CUDA graph cannot capture its reuse
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):
                return models[w](inputs[w])
        return run

    streams = branch_concurrency.streamed(models["piip"], dev)

    def streamed() -> Any:
        with branch_concurrency.scheduled(models["piip"], streams):
            return forward("piip")()

    fns: dict[str, Callable[[], Any]] = {"piip eager": forward("piip"), "base eager": forward("base"),
                                          "piip streams": streamed}
    errors: dict[str, str] = {}
    if dev.type == "cuda":
        for name, fn in (("piip graph", forward("piip")), ("base graph", forward("base")),
                         ("piip streams+graph", streamed)):
            try:
                fns[name] = cuda_graphed(fn)
                fns[name]()
                torch.cuda.synchronize()
            except Exception as e:  # reported, the other variants still run
                fns.pop(name, None)
                errors[name] = latency._first_line(e)
    else:
        errors["graphs"] = "CUDA graphs need CUDA (dry run on CPU)"
    eager = {w: fns[f"{w} eager"]() for w in ("piip", "base")}
    rows = []
    for name, fn in fns.items():
        rows.append({"variant": name, "rel_diff": max_rel_diff(fn(), eager[name.split()[0]])})
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = timed_interleaved(fns, repeats, sync)
    for r in rows:
        w = r["variant"].split()[0]
        r.update(s=times[r["variant"]], vs_base_eager=times[r["variant"]] / times["base eager"],
                 speedup=times[f"{w} eager"] / times[r["variant"]])
        print(f"(d) {r['variant']:20s} {r['s'] * 1e3:9.2f} ms  x{r['speedup']:.2f} over its eager  "
              f"/ base eager {r['vs_base_eager']:.3f}  rel diff {r['rel_diff']:.1e}", flush=True)
    out = {"case": case.key, "piip_side": sides["piip"], "base_side": sides["base"], "repeats": repeats,
           "rows": rows, "errors": errors}
    if "piip graph" in times and "base graph" in times:
        out["graph_ratio"] = times["piip graph"] / times["base graph"]
    return out


def markdown(res: dict) -> str:
    """The tables docs/performance.md quotes."""
    from latency import markdown as latency_md
    lines = [f"GPU suite, {res['date']}, **{res['card']}**, torch {res['torch']}, triton {res['triton']}"
             f"{' (DRY RUN: CPU, tiny sizes, not a measurement)' if res['dry_run'] else ''}; "
             f"`python benchmarks/gpu_suite.py` ({res['elapsed_s']:.0f} s).", ""]
    if res.get("correctness"):
        lines += ["(a) triton vs reference, max |diff| / max |reference|:", "",
                  "| shape | dtype | out | grad value | grad loc | grad attn | tolerance | ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["correctness"]:
            e = r["rel_err"]
            lines.append(f"| {r['shape']} | {r['dtype']} | {e['out']:.1e} | {e['grad value']:.1e} | "
                         f"{e['grad loc']:.1e} | {e['grad attn']:.1e} | {r['tol']:.0e} | {'yes' if r['ok'] else '**no**'} |")
        lines.append("")
    if res.get("speed"):
        lines += ["(b) deformable attention, float32, batch 1, median of interleaved runs:", "",
                  "| shape | impl | fwd ms | fwd+bwd ms | fwd speed-up vs reference | fwd+bwd speed-up |",
                  "|---|---|---|---|---|---|"]
        for r in res["speed"]:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['fwd_speedup']:.2f} | {r['fwd_bwd_speedup']:.2f} |")
        lines.append("")
    if res.get("models"):
        lines += ["(c) PIIP-TSB vs ViTDet-B, bfloat16 autocast:", "", latency_md(res["models"], "").strip(), ""]
    sch = res.get("schedules")
    if sch:
        lines += [f"(d) PIIP-TSB ({sch['piip_side']} px) vs ViTDet-B ({sch['base_side']} px) as built, eval forward, "
                  f"batch 1, bfloat16 autocast, schedules (median of {sch['repeats']} interleaved runs):", "",
                  "| variant | ms | speed-up over the model's eager | / ViTDet-B eager | max rel diff from eager |",
                  "|---|---|---|---|---|"]
        for r in sch["rows"]:
            lines.append(f"| {r['variant']} | {r['s'] * 1e3:.2f} | {r['speedup']:.2f} | {r['vs_base_eager']:.3f} | "
                         f"{r['rel_diff']:.1e} |")
        if "graph_ratio" in sch:
            lines += ["", f"Both as CUDA graphs, PIIP / ViTDet-B: **{sch['graph_ratio']:.3f}**."]
        for k, v in sch["errors"].items():
            lines += ["", f"{k}: {v}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for the results")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument("--sections", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs (default 20 for the op, 10 for models, 20 for the schedules)")
    ap.add_argument("--no-compile", action="store_true", help="(c) eager only")
    ap.add_argument("--docs", action="store_true", help="regenerate the block in docs/performance.md")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before piip imports triton: kernels then run on CPU
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; skipped (--dry-run runs the same code paths on CPU)")
        return 0
    t0 = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from piip.ops import available_impls
    res: dict[str, Any] = {
        "date": str(datetime.date.today()), "dry_run": args.dry_run, "torch": torch.__version__,
        "triton": triton_version, "card": torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)",
        "elapsed_s": 0.0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t0
        (out / "gpu_suite.json").write_text(json.dumps(res, indent=1))
        (out / "gpu_suite.md").write_text(markdown(res))

    # the dry run: one DINO and one PIIP shape, shrunk (Triton's interpreter is slow)
    shapes = {k: _tiny(SHAPES[k]) for k in ("DINO encoder", "TSB S->T")} if args.dry_run else SHAPES
    has_triton = "triton" in available_impls()
    if "a" in args.sections:
        if has_triton:
            res["correctness"] = check_triton(shapes, device, [torch.float32, torch.bfloat16])
        else:
            res["correctness_skipped"] = "triton does not import"
        save()
    if "b" in args.sections:
        impls = ["reference", "fused"] + (["triton"] if has_triton else [])
        res["speed"] = time_impls(shapes, device, impls, args.repeats or (2 if args.dry_run else 20))
        if has_triton:
            fwd = [r["fwd_speedup"] for r in res["speed"] if r["impl"] == "triton"]
            res["triton_fwd_speedup_geomean"] = statistics.geometric_mean(fwd)
        save()
    # (d) before (c): it compiles nothing, while (c)'s compiles may run into a time limit
    if "d" in args.sections:
        res["schedules"] = schedules(device, args.dry_run, args.repeats or (2 if args.dry_run else 20))
        save()
    if "c" in args.sections:
        backend = "aot_eager" if args.dry_run else "inductor"
        res["models"] = model_pairs(device, args.dry_run, args.repeats or (1 if args.dry_run else 10),
                                    None if args.no_compile else {"backend": backend})
        save()
    table = markdown(res)
    print(table)
    if args.docs:
        from latency import DOCS, update_docs
        update_docs(table, DOCS, BEGIN, END)
    bad = [r for r in res.get("correctness", []) if not r["ok"]]
    print(f"gpu_suite: wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {res['elapsed_s']:.0f} s"
          + (f"; {len(bad)} MISMATCH(ES)" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
