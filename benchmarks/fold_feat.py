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

import torch

from compiled_impl import max_rel_diff
from deform_attn import timed_interleaved
from latency import CASES, build_model, case_key, case_sides, draw_gates, make_step
from onednn_linear import switched
from piip.layers import fold
from piip.layers.interaction import InteractionEdge

CPU = torch.device("cpu")


def edge_paths(model, step, repeats: int) -> list[str]:
    """Per folded edge kind (d_in -> d_out -> v at its token count): stock vs folded path time."""
    inputs = {}

    def keep(name: str):
        def hook(mod, args) -> None:       # (a pre-hook returning a value would replace the args)
            inputs.setdefault(name, (mod, args[2]))
        return hook
    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in model.named_modules() if type(m) is InteractionEdge]
    switched(step, fold.set_enabled, False)()
    for h in hooks:
        h.remove()
    rows, seen = [], set()
    with torch.inference_mode():
        for name, (edge, feat) in inputs.items():
            inj = edge.injector
            key = (tuple(feat.shape), edge.proj.in_features, edge.proj.out_features, inj.attn.value_proj.out_features)
            if key in seen or fold.folded_path(edge.proj, inj.feat_norm, inj.attn.value_proj, feat) is None:
                continue
            seen.add(key)
            t = timed_interleaved({
                "stock": lambda: inj.attn.value_proj(inj.feat_norm(edge.proj(feat))),
                "folded": lambda: fold.folded_path(edge.proj, inj.feat_norm, inj.attn.value_proj, feat)},
                repeats, lambda: None)
            s, f = t["stock"] * 1e3, t["folded"] * 1e3
            rows.append(f"  edge {name.split('.')[-1]:5s} tokens {key[0][0]}x{key[0][1]:<5d} {key[1]}->{key[2]}->{key[3]}: "
                        f"stock {s:.2f} ms, folded {f:.2f} ms ({s / f:.2f}x)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tsb-1120", "tsb-1120-built", "cls-eval"], metavar="CASE",
                    type=case_key)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="inputs at the cases' quick scale")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for key in args.cases:
        case = CASES[key]
        side = case_sides(case, args.quick)["piip"]
        model, _ = build_model(case, "piip", side, CPU)
        draw_gates(model)
        step = make_step(case, model, side, CPU)
        outs = {}

        def kept(flag: bool):              # each run keeps its output for the comparison below
            run = switched(step, fold.set_enabled, flag)
            return lambda: outs.__setitem__(flag, run())
        t = timed_interleaved({False: kept(False), True: kept(True)}, args.repeats, lambda: None)
        off, on = t[False], t[True]
        err = max_rel_diff(outs[True], outs[False])
        print(f"{key:15s} {case.piip} @ {side}: stock {off:.3f} s, folded {on:.3f} s, speed-up {off / on:.3f}x, "
              f"max rel diff {err:.1e}")
        for row in edge_paths(model, step, args.repeats):
            print(row)


if __name__ == "__main__":
    main()
