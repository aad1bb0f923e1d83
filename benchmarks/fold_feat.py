"""The interaction edges' feature-path fold (``piip.layers.fold``) against the stock modules, side by side.

For each case of ``latency.py`` (eval forwards only), the model is built once and run with the fold
off and on, interleaved, ``--repeats`` times (median); then every folded edge's feature path alone
(``proj -> feat_norm -> value_proj`` at the edge's real input) stock vs folded, and the largest
relative difference of the model's outputs (gates drawn in [0.5, 1.5] so that the edges matter).
One thread by default, float32, inference mode.

    PYTHONPATH=src python benchmarks/fold_feat.py [--cases tsb-1120 tsb-1120-built cls-eval] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from latency import CASES, _side, build_model, make_step
from piip.layers import fold
from piip.layers.interaction import InteractionEdge

CPU = torch.device("cpu")


def _flat(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return torch.cat([t.flatten() for t in out])
    return out.flatten()


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def edge_paths(model, step, repeats: int) -> list[str]:
    """Per folded edge kind (d_in -> d_out -> v at its token count): stock vs folded path time."""
    inputs = {}

    def keep(name: str):
        def hook(mod, args) -> None:       # (a pre-hook returning a value would replace the args)
            inputs.setdefault(name, (mod, args[2]))
        return hook
    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules() if type(m) is InteractionEdge]
    fold.set_enabled(False)
    step()
    for h in hooks:
        h.remove()
    rows, seen = [], set()
    with torch.inference_mode():
        for name, (edge, feat) in inputs.items():
            inj = edge.injector
            key = (tuple(feat.shape), edge.proj.in_features, edge.proj.out_features, inj.attn.value_proj.out_features)
            if key in seen:
                continue
            seen.add(key)
            fold.set_enabled(True)
            if fold.folded_path(edge.proj, inj.feat_norm, inj.attn.value_proj, feat) is None:
                continue
            s = _median_ms(lambda: inj.attn.value_proj(inj.feat_norm(edge.proj(feat))), repeats)
            f = _median_ms(lambda: fold.folded_path(edge.proj, inj.feat_norm, inj.attn.value_proj, feat), repeats)
            rows.append(f"  edge {name.split('.')[-1]:5s} tokens {key[0][0]}x{key[0][1]:<5d} {key[1]}->{key[2]}->{key[3]}: "
                        f"stock {s:.2f} ms, folded {f:.2f} ms ({s / f:.2f}x)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tsb-1120", "tsb-1120-built", "cls-eval"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="inputs at the cases' quick scale")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for key in args.cases:
        case = CASES[key]
        side = _side(case.size, case.quick_scale, 16 if key.startswith("cls") else 32) if args.quick else case.size
        model, _ = build_model(case, "piip", side, CPU)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("gamma"):
                    p.uniform_(0.5, 1.5)
        step = make_step(case, model, side, CPU)
        outs, times = {}, {False: [], True: []}
        for flag in (False, True):          # warm both (the first folded call computes the folds)
            fold.set_enabled(flag)
            outs[flag] = _flat(step()).clone()
        for _ in range(args.repeats):
            for flag in (False, True):
                fold.set_enabled(flag)
                t = time.perf_counter()
                step()
                times[flag].append(time.perf_counter() - t)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        err = ((outs[True] - outs[False]).abs().max() / outs[False].abs().max()).item()
        print(f"{key:15s} {case.piip} @ {side}: stock {off:.3f} s, folded {on:.3f} s, speed-up {off / on:.3f}x, "
              f"max rel diff {err:.1e}")
        for row in edge_paths(model, step, args.repeats):
            print(row)
        fold.set_enabled(True)


if __name__ == "__main__":
    main()
