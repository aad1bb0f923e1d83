"""``piip flops``: parameter and FLOP counts (papers' convention and as built), analytic, in seconds."""
from __future__ import annotations

import argparse
import json
from typing import Optional

from ..complexity import KINDS, Complexity, count
from ..registry import list_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="count parameters and FLOPs (papers' convention and as built)",
                       description="Count parameters and FLOPs of registered models without running them. "
                                   "'params'/'flops' follow the papers (backbone only, 1 MAC = 1 FLOP, position "
                                   "embeddings at each branch's input grid, linear branch merging); "
                                   "'as built' counts the instantiated model (its merging, pyramid, heads).")
    p.add_argument("names", nargs="*", metavar="NAME", help="registered model names or wildcards ('piip_tsb*')")
    p.add_argument("--all", action="store_true", help="every registered model")
    p.add_argument("--img-size", type=float, nargs="+", default=None, metavar="PX",
                   help="finest-branch resolution (all branches scale together), or one value per branch")
    p.add_argument("--json", action="store_true", help="print a JSON list (params/flops integers, breakdown)")
    p.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table (docs)")
    p.add_argument("--breakdown", action="store_true",
                   help="print the per-module breakdown (default when a single model is given)")
    p.set_defaults(func=run)


def _resolve(names: list[str], all_models: bool) -> list[str]:
    if all_models:
        return list_models()
    if not names:
        raise ValueError("give at least one model NAME (see 'piip models') or --all")
    out: list[str] = []
    for n in names:
        matched = list_models(n) if any(ch in n for ch in "*?[") else [n]
        if not matched:
            raise ValueError(f"no registered model matches {n!r}")
        out += [m for m in matched if m not in out]
    return out


def _g(n: int) -> str:
    return f"{n / 1e9:.1f}G" if n >= 1e10 else f"{n / 1e9:.2f}G" if n >= 1e7 else f"{n / 1e9:.3f}G"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def format_table(results: list[Complexity], breakdown: bool) -> str:
    """Human-readable summary (and optional per-module breakdown)."""
    head = f"{'model':30s} {'resolution':20s} {'params':>9s} {'FLOPs':>9s}   {'as built':>9s} {'as built':>9s}"
    lines = [head, f"{'':30s} {'':20s} {'(paper)':>9s} {'(paper)':>9s}   {'params':>9s} {'FLOPs':>9s}"]
    for c in results:
        res = "/".join(f"{r:g}" for r in c.resolutions)
        lines.append(f"{c.model:30s} {res:20s} {_m(c.params):>9s} {_g(c.flops):>9s}   "
                     f"{_m(c.built_params):>9s} {_g(c.built_flops):>9s}")
        if breakdown:
            lines += _breakdown_lines(c)
    lines.append("paper: backbone only (+ classifier heads), 1 MAC = 1 FLOP, pos. embeddings at each branch's grid, "
                 "linear merging (regular-FPN hybrids: their real merges, as Table II); as built: the instantiated "
                 "model incl. its merging, pyramid and heads; PIIP-LLaVA towers (piip_llava_*, llava15_*): the vision "
                 "tower alone under that paper's counter")
    return "\n".join(lines)


def format_markdown(results: list[Complexity]) -> str:
    """The model zoo table of docs/model_zoo.md."""
    lines = ["| model | resolution | #Param (paper conv.) | #FLOPs (paper conv.) | #Param as built | #FLOPs as built |",
             "|---|---|---:|---:|---:|---:|"]
    for c in results:
        res = "/".join(f"{r:g}" for r in c.resolutions)
        lines.append(f"| {c.model} | {res} | {_m(c.params)} | {_g(c.flops)} | {_m(c.built_params)} | "
                     f"{_g(c.built_flops)} |")
    return "\n".join(lines)


def _breakdown_lines(c: Complexity) -> list[str]:
    kinds = [k for k in KINDS if any(r.flops_by_kind[k] for r in c.built_breakdown)]
    out = [f"    {'part':40s} {'params':>9s} {'FLOPs':>9s}  " + " ".join(f"{k:>9s}" for k in kinds)]
    for title, rows in (("paper convention", c.breakdown), (f"as built (merge={c.merge_built})", c.built_breakdown)):
        out.append(f"  {title}:")
        for r in rows:
            out.append(f"    {r.module:40s} {_m(r.params):>9s} {_g(r.flops):>9s}  "
                       + " ".join(f"{_g(r.flops_by_kind[k]):>9s}" for k in kinds))
    return out


def run(args: argparse.Namespace) -> Optional[int]:
    names = _resolve(args.names, args.all)
    results = [count(n, img_size=args.img_size) for n in names]
    if args.json:
        print(json.dumps([c.to_dict() for c in results], indent=1))
    elif args.markdown:
        print(format_markdown(results))
    else:
        print(format_table(results, breakdown=args.breakdown or len(results) == 1))
    return 0
