"""The working tree's piip against an earlier git revision's, side by side in one process.

A speed change is judged by timing it next to what it replaces: separate processes on a shared VM
drift by several per cent, more than most single changes gain. This script copies ``src/piip`` of
``--base`` (``git archive``) into a temporary package ``piip_base`` (its custom-op namespaces
renamed so that both register), builds each case's PIIP model once from each package with the
same weights (the base model loads the current one's state dict), checks that the outputs agree,
and times the two interleaved (median). Cases are ``latency.py``'s (models built from
``create_model``: trunk, as built, classifier steps); ``--gates`` draws the interaction gates in
[0.5, 1.5] (at their zero init the interaction units' output is ignored).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ab_revisions.py --base HEAD~1 --cases cls-eval tsb-1120
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

import latency
from compiled_impl import max_rel_diff
from deform_attn import timed_interleaved
from latency import CASES, build_model, case_key, case_sides, draw_gates, make_step
from piip.runtime import tune_malloc

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("trunk", "as-built", "train", "cls", "cls-eval")
BASE_PACKAGE = "piip_base"


def import_revision(rev: str, into: Path, repo: Path = ROOT) -> Any:
    """``src/piip`` at ``rev`` imported as the package ``piip_base`` from ``into``."""
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src/piip"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise SystemExit(f"ab_revisions.py: cannot read src/piip at --base {rev!r} "
                         f"({err.decode(errors='replace').strip() or e}); give a commit of this repository")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    pkg = into / BASE_PACKAGE
    shutil.move(str(into / "src" / "piip"), str(pkg))
    for f in pkg.rglob("*.py"):   # custom ops: one namespace per package
        text = f.read_text()
        new = re.sub(r"([\"'])piip::", rf"\1{BASE_PACKAGE}::", text)
        if new != text:
            f.write_text(new)
    sys.path.insert(0, str(into))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # timm's "Overwriting ... in registry"
        try:
            import timm  # noqa: F401  (loaded first, so the base copy registers its names now)
        except ImportError:
            timm = None
        base = importlib.import_module(BASE_PACKAGE)
        if timm is not None:    # timm.create_model("piip_...") keeps building the working tree's models
            from piip.integrations.timm import register_all
            register_all()
    return base


def base_model(base: Any, case, side: int, current: torch.nn.Module, **overrides: Any) -> torch.nn.Module:
    """``case``'s PIIP model built by the base package, holding ``current``'s weights."""
    kept = latency.piip
    latency.piip = base            # build_model calls piip.create_model
    try:
        model, _ = build_model(case, "piip", side, torch.device("cpu"), **overrides)
    finally:
        latency.piip = kept
    model.load_state_dict(current.state_dict())
    return model


def compare(base: Any, key: str, repeats: int, gates: bool, quick: bool = False,
            overrides: Optional[dict] = None) -> dict:
    case = CASES[key]
    if case.kind not in KINDS:
        raise SystemExit(f"ab_revisions.py: case {key!r} ({case.kind}) is not built by create_model; "
                         f"choose one of {[k for k, c in CASES.items() if c.kind in KINDS]}")
    side = case_sides(case, quick)["piip"]
    cur, _ = build_model(case, "piip", side, torch.device("cpu"), **dict(overrides or {}))
    if gates:
        draw_gates(cur)
    old = base_model(base, case, side, cur, **dict(overrides or {}))
    outs: dict[str, Any] = {}

    def kept(name: str, model: torch.nn.Module):    # each run keeps its output for the comparison below
        step = make_step(case, model, side, torch.device("cpu"))
        return lambda: outs.__setitem__(name, step())
    med = timed_interleaved({"base": kept("base", old), "current": kept("current", cur)}, repeats, lambda: None)
    row = dict(case=key, base_s=med["base"], current_s=med["current"], speedup=med["base"] / med["current"])
    if outs["base"] is not None:                   # (training steps return nothing)
        row["max_rel_diff"] = max_rel_diff(outs["current"], outs["base"])
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1, a commit)")
    ap.add_argument("--cases", nargs="+", default=["cls-eval"], metavar="CASE", type=case_key)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="latency.py's reduced sizes")
    ap.add_argument("--gates", action="store_true", help="interaction gates drawn in [0.5, 1.5]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    tmp = Path(tempfile.mkdtemp(prefix="piip_ab_"))
    try:
        base = import_revision(args.base, tmp)
        print(f"base {args.base}, {args.threads} thread(s), median of {args.repeats} interleaved passes"
              f"{', gates drawn' if args.gates else ''}", flush=True)
        print("| case | base s | current s | speed-up | max rel diff |\n|---|---|---|---|---|")
        for key in args.cases:
            r = compare(base, key, args.repeats, args.gates, args.quick)
            diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"
            print(f"| {key} | {r['base_s']:.3f} | {r['current_s']:.3f} | {r['speedup']:.3f}x | {diff} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
