"""Compiled vs eager training gradients, both measured against a float64 eager reference.

Run: ``PYTHONPATH=src python benchmarks/compile_grad_check.py [--backend inductor|aot_eager] [--size 128]
[--depth 1] [--drop-path] [--deform-impl fused]``. Tiny PIIP-TSB (tests/conftest.py widths), the
deformable op forced on both sides (default ``fused``, what compiling selects on CPU; the eager side
then runs its sorted backward, the compiled side the one written for Inductor),
parameters perturbed by N(0, 0.05) so that gradients flow through the interactions, batch 2 then 3
(a dynamic recompile). Prints, per step, the largest value of each column over all parameters and the four parameters with the largest compiled-vs-eager
difference, each as max |diff| / the largest |grad| of the three for compiled-eager, compiled-f64 and eager-f64.
``--drop-path`` keeps the registered stochastic depth (each side then draws its own masks).
See docs/deploy.md, "Compiled training".
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--drop-path", action="store_true")
    ap.add_argument("--deform-impl", default="fused", choices=["fused", "reference"])
    args = ap.parse_args()
    os.environ["PIIP_DEFORM_IMPL"] = args.deform_impl
    import piip
    from conftest import tiny_overrides
    torch.manual_seed(0)
    over = tiny_overrides("piip_tsb_1120_896_448", args.size)
    over["branches"] = [dict(b, depth=args.depth, **({} if args.drop_path else {"drop_path": 0.0}))
                        for b in over["branches"]]
    if not args.drop_path:
        over["interaction_drop_path"] = 0.0
    model = piip.create_model("piip_tsb_1120_896_448", **over).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    eager, f64 = copy.deepcopy(model), copy.deepcopy(model).double()
    model.compile(backend=args.backend)
    for b in (2, 3):
        x = torch.randn(b, 3, args.size, args.size, dtype=torch.float64)
        for m, inp in ((model, x.float()), (eager, x.float()), (f64, x)):
            sum(v.pow(2).mean() for v in m(inp).values()).backward()
        gc, g64 = dict(model.named_parameters()), dict(f64.named_parameters())
        rows = []
        for n, p in eager.named_parameters():
            if p.grad is None:
                continue
            s = max(g64[n].grad.abs().max().item(), p.grad.abs().max().item(), gc[n].grad.abs().max().item(), 1e-30)
            rows.append(((gc[n].grad - p.grad).abs().max().item() / s,
                         (gc[n].grad.double() - g64[n].grad).abs().max().item() / s,
                         (p.grad.double() - g64[n].grad).abs().max().item() / s, n))
        print(f"batch {b} ({args.backend}, {args.size} px): max|diff| / max|grad|  compiled-eager  compiled-f64  eager-f64")
        for r in sorted(rows, reverse=True)[:4]:
            print("  %.1e  %.1e  %.1e  %s" % r)
        print("  %.1e  %.1e  %.1e  (largest of each column over all parameters)" % tuple(max(c) for c in list(zip(*rows))[:3]))
        for m in (model, eager, f64):
            m.zero_grad()


if __name__ == "__main__":
    main()
