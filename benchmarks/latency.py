"""Eager and ``torch.compile`` latency of PIIP models against their baselines, side by side in one run.

Run (the lead's quiet-machine run; the docs table comes from it)::

    PYTHONPATH=src python benchmarks/latency.py --quick --docs      # reduced resolution, ~10 min on 1 core
    PYTHONPATH=src python benchmarks/latency.py                     # every case at the papers' sizes (hours on CPU)
    PYTHONPATH=src python benchmarks/latency.py --cases tsb-1120 cls --no-compile --repeats 5

Cases (``--list``): every Table I pair (PIIP-TSB / SBL / TSBL vs ViTDet-B / L) as ``trunk``
(``forward_features`` of the model built with ``merge='linear'``, what the papers count, against the
ViTDet trunk) and ``as-built`` (the full ``forward``: released ``conv`` merging + pyramid, against
ViTDet with its pyramid), eval mode, batch 1; the classifier pair (PIIP-TSB 368/192/128 vs DeiT-B 224,
train step: forward + soft-target cross-entropy + backward); the segmentor pair (PIIP-TSB 896/448/336
vs ViT-B 640 UperNet, eval forward); the DINO step (PIIP-TSB 1120 vs ViTDet-B 1024 backbone, full DINO
head, forward + backward on one image with 6 boxes; compiled = the backbone compiled, the head eager).

Method: the two models of a case and their compiled versions (``torch.compile`` of the same module,
static shapes, otherwise default settings; each case from a fresh Dynamo state) warm up first (eager: one pass counting FLOPs with ``torch.utils.flop_counter`` and
one plain pass; compiled: two passes, the first timed as the compile time), then the four run interleaved ``--repeats`` times and
the medians are printed. Ratios are PIIP / baseline latency of the same run next to the FLOPs ratio of
``piip.complexity`` (``piip flops``: paper convention for ``trunk``, as built otherwise; for the
segmentor and DINO the backbone as built, heads not counted) and the ratio torch's counter saw in the
whole step. ``--quick`` scales every input by its case's quick factor (a quarter of the side for the
dense pairs) and keeps one Table I configuration per family; FLOPs are counted at the sizes that run.
One thread by default (``--threads``); CUDA too when present (``--devices``).

Set ``OMP_NUM_THREADS`` to the ``--threads`` value in the environment (the header prints it):
``torch.set_num_threads`` alone leaves Inductor's compiled CPU graphs slower here. On this 2-vCPU VM the
compiled PIIP classifier ran 0.89x of its eager speed without it and 1.04x with
``OMP_NUM_THREADS=1`` (docs/performance.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import piip
from piip.complexity import count
from piip.layers import fold as feat_fold
from piip.ops import linear as onednn_linear
from piip.ops import opaque, winograd
from piip.runtime import tune_malloc
from torch_count import counted_macs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- latency.py:begin -->", "<!-- latency.py:end -->"


@dataclasses.dataclass
class Case:
    """One PIIP-vs-baseline comparison; ``kind`` picks how models are built and stepped."""

    key: str
    kind: str                 # 'trunk' | 'as-built' | 'train' | 'cls' | 'cls-eval' | 'seg' | 'dino'
    piip: str
    base: str
    size: int                 # PIIP finest-branch input side at the papers' setting
    base_size: int
    quick_scale: float        # input side factor in --quick mode
    quick: bool = False       # part of the --quick selection
    step: str = "eval forward"


def _table1() -> list[Case]:
    cases = []
    for name, size, base in [
            ("piip_tsb_1120_896_448", 1120, "vitdet_b_1024"), ("piip_tsb_1568_896_448", 1568, "vitdet_b_1024"),
            ("piip_tsb_1568_1120_672", 1568, "vitdet_b_1024"), ("piip_sbl_1120_672_448", 1120, "vitdet_l_1024"),
            ("piip_sbl_1344_896_448", 1344, "vitdet_l_1024"), ("piip_sbl_1568_896_672", 1568, "vitdet_l_1024"),
            ("piip_tsbl_1344_896_672_448", 1344, "vitdet_l_1024"),
            ("piip_tsbl_1568_1120_672_448", 1568, "vitdet_l_1024"),
            ("piip_tsbl_1792_1568_1120_448", 1792, "vitdet_l_1024")]:
        fam = name.split("_")[1]
        first = name in ("piip_tsb_1120_896_448", "piip_sbl_1344_896_448", "piip_tsbl_1344_896_672_448")
        # two TSB configurations start at 1568: the second branch's size tells them apart
        key = f"{fam}-{size}" + ("-896" if name == "piip_tsb_1568_896_448" else "")
        for kind in ("trunk", "as-built"):
            cases.append(Case(key + ("" if kind == "trunk" else "-built"), kind, name, base, size, 1024,
                              0.25, quick=first and (kind == "trunk" or fam == "tsb")))
    keys = [c.key for c in cases]
    assert len(set(keys)) == len(keys), f"duplicate case keys: {keys}"
    return cases


EVAL_BATCH = 8    # the classifiers' inference-throughput case

CASES = {c.key: c for c in _table1() + [
    Case("cls", "cls", "piip_tsb_368_192_128_cls", "deit_b_224_cls", 368, 224, 0.5, True, "train step, batch 2"),
    Case("cls-eval", "cls-eval", "piip_tsb_368_192_128_cls", "deit_b_224_cls", 368, 224, 0.5, False,
         f"eval forward, batch {EVAL_BATCH}"),
    Case("seg", "seg", "piip_tsb_896_448_336_seg", "vit_b_640_seg", 896, 640, 0.25, True, "eval forward"),
    Case("tsb-1120-train", "train", "piip_tsb_1120_896_448", "vitdet_b_1024", 1120, 1024, 0.25, False,
         "train step (as built)"),
    Case("dino", "dino", "piip_tsb_1120_896_448", "vitdet_b_1024", 1120, 1024, 0.25, True, "train step"),
]}


def case_key(key: str) -> str:
    """argparse ``type`` of every benchmark's ``--cases``: an unknown key is one usage line and exit
    code 2, naming the known ones."""
    if key not in CASES:
        raise argparse.ArgumentTypeError(f"unknown case {key!r}; choose from {', '.join(CASES)} (--list in latency.py)")
    return key


def _side(size: int, scale: float, multiple: int = 32) -> int:
    return max(multiple, int(round(size * scale / multiple)) * multiple)


# ---------------------------------------------------------------------------- models and steps
def build_model(case: Case, which: str, side: int, device: torch.device, **overrides: Any) -> tuple[nn.Module, float]:
    """The PIIP (``which='piip'``) or baseline model of ``case`` for input ``side``, and its
    ``piip.complexity`` FLOPs (MACs) for the ratio column."""
    name = case.piip if which == "piip" else case.base
    torch.manual_seed(0)
    if case.kind in ("trunk", "as-built", "train"):
        if case.kind == "trunk" and which == "piip":
            overrides = {"merge": "linear", **overrides}
        model = piip.create_model(name, img_size=side, **overrides)
        model.train(case.kind == "train")
        c = count(name, img_size=[side], **overrides)
        flops = c.flops if case.kind == "trunk" else c.built_flops
    elif case.kind == "seg":
        from piip.tasks.segmentation import SegmentorConfig, build_segmentor
        model = build_segmentor(name, 150, SegmentorConfig(channels=512, aux_channels=256), img_size=side,
                                **overrides).eval()
        flops = count(name, img_size=[side], **overrides).built_flops
    elif case.kind in ("cls", "cls-eval"):
        model = piip.create_model(name, img_size=side, **overrides).train(case.kind == "cls")
        flops = count(name, img_size=[side], **overrides).flops
    elif case.kind == "dino":
        from piip.tasks.detection import DetectorConfig, build_detector
        det = DetectorConfig(**overrides.pop("det", {}))   # the tests shrink the head with it
        model = build_detector(name, 80, "dino", det, img_size=side, **overrides).train()
        flops = count(name, img_size=[side], pyramid_levels=[1, 2, 3], **overrides).built_flops
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    return model.to(device), float(flops)


def draw_gates(model: nn.Module, seed: int = 1) -> None:
    """Interaction gates (``ca_gamma``, ``cffn_gamma``) drawn in [0.5, 1.5]: at their zero init the
    interaction units' output is ignored, so A/B checks of those paths would compare nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.5)


def make_step(case: Case, model: nn.Module, side: int, device: torch.device,
              compiled: Optional[dict] = None) -> Callable[[], Any]:
    """A zero-argument step of ``model`` on fixed random inputs: eager, or (``compiled``: the
    ``torch.compile`` keyword arguments) through ``torch.compile`` of the same module, the whole model
    or, for DINO, its backbone.

    Compiled with static shapes unless ``compiled`` says ``dynamic``: a PIIP model and its baseline
    are often the same class (ViTDet and DeiT are one-branch PIIP models), so the second one compiled
    is a recompile of the same code at another input size, which Dynamo's automatic dynamic shapes
    would trace with symbolic sizes; a user compiling one model at one size gets a static graph."""
    compiled = None if compiled is None else {"dynamic": False, **compiled}
    g = torch.Generator().manual_seed(0)
    if case.kind == "dino":
        h = side * 3 // 4
        image = torch.rand(3, h, side, generator=g).to(device)
        xy = torch.rand(6, 2, generator=g) * torch.tensor([side * 0.7, h * 0.7])
        wh = (torch.rand(6, 2, generator=g) * 0.25 + 0.05) * torch.tensor([side, h])
        target = {"boxes": torch.cat([xy, xy + wh], 1).to(device),
                  "labels": torch.randint(1, 81, (6,), generator=g).to(device)}
        holder = model.backbone
        body = holder.body
        body_c = torch.compile(body, **compiled) if compiled is not None else body

        def dino_step() -> Any:
            holder._modules["body"] = body_c   # the compiled backbone only for this step
            try:
                loss = sum(model([image], [target]).values())
                loss.backward()
            finally:
                holder._modules["body"] = body
            model.zero_grad(set_to_none=True)
        return dino_step
    fn = model.forward_features if case.kind == "trunk" else model
    fn = torch.compile(fn, **compiled) if compiled is not None else fn
    if case.kind == "train":
        x = torch.randn(1, 3, side, side, generator=g).to(device)

        def train_step() -> Any:
            loss = sum(m.float().mean() for m in fn(x).values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return train_step
    if case.kind == "cls":
        x = torch.randn(2, 3, side, side, generator=g).to(device)
        target = torch.softmax(torch.randn(2, 1000, generator=g), -1).to(device)

        def cls_step() -> Any:
            loss = torch.sum(-target * torch.log_softmax(fn(x).float(), -1), -1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return cls_step
    batch = EVAL_BATCH if case.kind == "cls-eval" else 1
    x = (torch.rand if case.kind == "seg" else torch.randn)(batch, 3, side, side, generator=g).to(device)

    def eval_step() -> Any:
        with torch.inference_mode():
            return fn(x)
    return eval_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- measuring
def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def case_sides(case: Case, quick: bool) -> dict[str, int]:
    """Input sides of the PIIP and baseline models (multiples of 32, 16 for the classifiers)."""
    if not quick:
        return {"piip": case.size, "base": case.base_size}
    mult = 16 if case.kind.startswith("cls") else 32
    return {"piip": _side(case.size, case.quick_scale, mult), "base": _side(case.base_size, case.quick_scale, mult)}


def _autocast(step: Callable[[], Any], device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], Any]:
    if dtype is None:
        return step

    def run() -> Any:
        with torch.autocast(device.type, dtype=dtype):
            return step()
    return run


def _peak_mib(step: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak allocated CUDA memory during one step, MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def measure_case(case: Case, quick: bool, repeats: int, device: torch.device, compile_: Optional[dict] = None,
                 overrides: Optional[dict[str, dict]] = None, autocast: Optional[torch.dtype] = None) -> dict:
    """Warm up, then run PIIP / baseline, eager / compiled interleaved; medians, ratios and FLOPs.

    ``compile_``: ``torch.compile`` keyword arguments (None: eager only); ``overrides``: per model
    ('piip' / 'base') config overrides (the tests shrink widths with it); ``autocast``: e.g.
    ``torch.bfloat16`` (weights stay float32). On CUDA each step's peak memory is reported too."""
    overrides = overrides or {}
    sides = case_sides(case, quick)
    models, flops, steps, counted, compile_s, errors = {}, {}, {}, {}, {}, {}
    for w in ("piip", "base"):
        models[w], flops[w] = build_model(case, w, sides[w], device, **dict(overrides.get(w, {})))
        steps[w] = _autocast(make_step(case, models[w], sides[w], device), device, autocast)
        counted[w] = counted_macs(steps[w])   # eager warm-up = FLOP count
        steps[w]()   # a warm-up outside the counter too
    if compile_ is not None:
        # a fresh Dynamo state a case: earlier cases' graphs would count toward the recompile limit
        # of the code they share (past it Dynamo runs the step eagerly, without an error)
        torch._dynamo.reset()
        for w in ("piip", "base"):
            try:
                step = _autocast(make_step(case, models[w], sides[w], device, compiled=compile_), device, autocast)
                compile_s[w] = _timed(step, device)
                step()   # recompiles (a second call can specialise again) happen here, not in the timing
                steps[w + "-compiled"] = step
            except Exception as e:  # reported in the table instead of stopping the run
                errors[w] = _first_line(e)
                torch._dynamo.reset()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(repeats):
        for k in (list(steps) if i % 2 == 0 else list(reversed(steps))):
            times[k].append(_timed(steps[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    row: dict[str, Any] = dict(
        case=case.key, kind=case.kind, step=case.step, piip=case.piip, base=case.base,
        piip_side=sides["piip"], base_side=sides["base"], device=str(device), repeats=repeats,
        dtype=str(autocast or torch.float32).replace("torch.", ""), times=times,
        peak_mib={k: _peak_mib(v, device) for k, v in steps.items()} if device.type == "cuda" else {},
        piip_eager_s=med["piip"], base_eager_s=med["base"], eager_ratio=med["piip"] / med["base"],
        flops_ratio=flops["piip"] / flops["base"], piip_gflops=flops["piip"] / 1e9, base_gflops=flops["base"] / 1e9,
        counted_ratio=counted["piip"] / counted["base"], compile_errors=errors, compile_s=compile_s)
    if "piip-compiled" in med:
        row.update(piip_compiled_s=med["piip-compiled"], piip_compile_speedup=med["piip"] / med["piip-compiled"])
    if "base-compiled" in med:
        row.update(base_compiled_s=med["base-compiled"], base_compile_speedup=med["base"] / med["base-compiled"])
    if "piip-compiled" in med and "base-compiled" in med:
        row["compiled_ratio"] = med["piip-compiled"] / med["base-compiled"]
    return row


# ---------------------------------------------------------------------------- reporting
def _f(v: Optional[float], fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | step | PIIP (side px) | baseline (side px) | device | PIIP eager s | base eager s | **eager ratio** "
             "| PIIP compiled s | base compiled s | **compiled ratio** | compile speed-up PIIP / base "
             "| FLOPs ratio (piip flops) | counted ratio (torch) | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = [f"{w} compile failed: {e}" for w, e in r["compile_errors"].items()]
        if r.get("peak_mib"):
            notes.append("peak MiB " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mib"].items()))
        notes = "; ".join(notes)
        lines.append(
            f"| {r['case']} | {r['step']} | {r['piip']} ({r['piip_side']}) | {r['base']} ({r['base_side']}) "
            f"| {r['device']} {r['dtype']} | {_f(r['piip_eager_s'])} | {_f(r['base_eager_s'])} | **{_f(r['eager_ratio'])}** "
            f"| {_f(r.get('piip_compiled_s'))} | {_f(r.get('base_compiled_s'))} | **{_f(r.get('compiled_ratio'))}** "
            f"| {_f(r.get('piip_compile_speedup'), '.2f')} / {_f(r.get('base_compile_speedup'), '.2f')} "
            f"| {_f(r['flops_ratio'])} | {_f(r['counted_ratio'])} | {notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def update_docs(table: str, path: Path = DOCS, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the markers ``begin`` / ``end`` of ``path`` with ``table``."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} block to regenerate")
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{table}{end}", text, flags=re.S)
    path.write_text(new)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None, metavar="CASE", type=case_key,
                    help="cases to run (default: all, or the --quick selection); see --list")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--quick", action="store_true", help="reduced inputs, one Table I configuration per family")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per model (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights float32)")
    ap.add_argument("--no-onednn", action="store_true",
                    help="eager CPU inference through F.linear instead of piip.ops.linear's oneDNN path")
    ap.add_argument("--no-prepack", action="store_true",
                    help="oneDNN re-lays each weight out on every call (piip.ops.linear.set_prepack(False))")
    ap.add_argument("--no-fold", action="store_true",
                    help="interaction edges' feature path unfolded (piip.layers.fold off), eager and compiled")
    ap.add_argument("--no-winograd", action="store_true",
                    help="the merge's wide 3x3 convs by direct convolution (piip.ops.winograd off), eager and compiled")
    ap.add_argument("--no-opaque", action="store_true",
                    help="compiled CPU inference without piip's opaque eager ops (piip.ops.opaque off)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    ap.add_argument("--docs", action="store_true", help=f"regenerate the table in {DOCS.name}")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES.values():
            print(f"{c.key:18s} {c.kind:8s} {c.piip} vs {c.base} ({c.step}){'  [quick]' if c.quick else ''}")
        return 0
    keys = args.cases or [k for k, c in CASES.items() if c.quick or not args.quick]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    if args.no_onednn:
        onednn_linear.set_enabled(False)
    if args.no_prepack:
        onednn_linear.set_prepack(False)
    if args.no_fold:
        feat_fold.set_enabled(False)
    if args.no_opaque:
        opaque.set_enabled(False)
    if args.no_winograd:
        winograd.set_enabled(False)
    header = (f"Measured {datetime.date.today()} with `python benchmarks/latency.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`: {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {args.threads} thread(s), {'bfloat16 autocast' if args.bf16 else 'float32'}, "
              f"median of {args.repeats} interleaved passes, malloc tuned: {tuned}, "
              f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, "
              f"oneDNN linears (eager inference): {'on' if onednn_linear.enabled() else 'off'}"
              f"{' (engine tuned per shape)' if onednn_linear.enabled() and onednn_linear.tuning() else ''}"
              f"{', weights prepacked' if onednn_linear.enabled() and onednn_linear.prepacking() else ''}, "
              f"feature-path fold (inference): {'on' if feat_fold.enabled() else 'off'}, "
              f"Winograd merge convs (inference): {'on' if winograd.enabled() else 'off'}, compile: "
              f"{'off' if args.no_compile else f'backend {args.backend}, mode {args.mode}'}"
              f"{'' if args.no_compile else ', opaque eager ops ' + ('on' if opaque.enabled() else 'off')}"
              + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else "") + ".")
    print(header, flush=True)
    compile_ = None if args.no_compile else {"backend": args.backend, "mode": args.mode}
    rows = []
    for dev in devices:
        for k in keys:
            t0 = time.perf_counter()
            r = measure_case(CASES[k], args.quick, args.repeats, torch.device(dev), compile_,
                             autocast=torch.bfloat16 if args.bf16 else None)
            rows.append(r)
            print(f"{k:14s} {dev:4s} eager {r['piip_eager_s']:.3f}/{r['base_eager_s']:.3f}s ratio "
                  f"{r['eager_ratio']:.3f} | compiled ratio {_f(r.get('compiled_ratio'))} "
                  f"(PIIP x{_f(r.get('piip_compile_speedup'), '.2f')}) | FLOPs {r['flops_ratio']:.3f} "
                  f"counted {r['counted_ratio']:.3f} | {time.perf_counter() - t0:.0f}s"
                  + (f" | compile failed: {r['compile_errors']}" if r["compile_errors"] else ""), flush=True)
    table = markdown(rows, header)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.docs:
        update_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
