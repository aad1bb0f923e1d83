"""Do PIIP's branches gain from running concurrently on CPU? Side by side in one run, two threads:

* ``intra``: branches one after another, each op using both threads (PyTorch's default);
* ``fork``: within each group the branches' blocks run concurrently in a pool of Python threads (ops
  release the GIL; ``torch.jit.fork`` runs synchronously in eager mode, so it cannot do this), each
  op single-threaded; interactions stay sequential (each pair reads the state the last one wrote).

Run: ``PYTHONPATH=src python benchmarks/branch_concurrency.py [--model piip_tsb_1120_896_448]
[--side 560] [--repeats 5]``. Prints the median latency of each and fork / intra. Eval mode, batch 1,
``forward_features`` (the trunk); the outputs of the two are checked equal first.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import piip


def _group(branch: torch.nn.Module, tokens, g: int):
    torch.set_num_threads(1)   # OpenMP's thread count is per OS thread: a pool thread starts at all cores
    with torch.no_grad():      # grad mode is per thread too: the pool's threads start with it on
        return branch.forward_group(tokens, g)


def forked_features(backbone: torch.nn.Module, x: torch.Tensor, pool: ThreadPoolExecutor) -> torch.Tensor:
    """``backbone.forward_features`` with each group's branch blocks run concurrently (same arithmetic)."""
    states = [br.embed(v) for br, v in zip(backbone.branches, backbone.resize_inputs(x))]
    for g in range(backbone.num_groups):
        futures = [pool.submit(_group, br, t, g) for br, t in zip(backbone.branches, states)]
        states = [f.result() for f in futures]
        if backbone.interactions is not None:
            xs = backbone.interactions[g]([t.x for t in states], [t.hw for t in states])
            states = [t._replace(x=nx) for t, nx in zip(states, xs)]
    return backbone.merge_tokens(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="piip_tsb_1120_896_448")
    ap.add_argument("--side", type=int, default=560, help="input side (a multiple of 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = piip.create_model(args.model, merge="linear").eval()
    x = torch.rand(1, 3, args.side, args.side)
    pool = ThreadPoolExecutor(args.threads)
    with torch.no_grad():
        torch.set_num_threads(args.threads)
        ref = model.forward_features(x)
        torch.set_num_threads(1)
        out = forked_features(model, x, pool)
        print(f"max |fork - intra| = {(out - ref).abs().max().item():.2e}")
        times = {}
        for _ in range(args.repeats):      # interleaved: one pass each per round
            for name, threads, fn in (("intra", args.threads, model.forward_features),
                                      ("fork", 1, lambda t: forked_features(model, t, pool))):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn(x)
                times.setdefault(name, []).append(time.perf_counter() - start)
    intra, fork = (statistics.median(times[k]) for k in ("intra", "fork"))
    print(f"{args.model} at {args.side} px, {args.threads} threads: intra {intra:.3f} s, fork {fork:.3f} s, "
          f"fork / intra {fork / intra:.3f}")


if __name__ == "__main__":
    main()
