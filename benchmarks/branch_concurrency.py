"""Do PIIP's branches gain from running concurrently? Within a group the branches' blocks are
independent (they meet only in the interaction units after it), so two schedules can replace the
backbone's one-after-another ``forward_group`` on an instance:

* ``forked`` (CPU): the blocks run in a pool of Python threads (ops release the GIL;
  ``torch.jit.fork`` runs synchronously in eager mode, so it cannot do this), each op single-threaded;
* ``streamed`` (CUDA): each branch's blocks are queued on its own CUDA stream, forked from and joined
  back into the current stream, so the GPU may overlap the narrow branches' kernels. On CPU the
  same code runs on PyTorch's no-op CPU streams (what the tests check). ``benchmarks/gpu_suite.py``
  measures it, with and without a CUDA graph.

Interactions stay sequential (each pair reads the state the last one wrote).

Run (CPU): ``PYTHONPATH=src python benchmarks/branch_concurrency.py [--model piip_tsb_1120_896_448]
[--side 560] [--repeats 5]``: ``intra`` (branches one after another, each op using all threads,
PyTorch's default) against ``fork``; eval mode, batch 1, ``forward_features`` (the trunk); outputs
checked equal first.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

import piip
from piip.branches.base import Tokens

GroupFn = Callable[[list[Tokens], int], list[Tokens]]


def _group(branch: torch.nn.Module, tokens: Tokens, g: int) -> Tokens:
    torch.set_num_threads(1)   # OpenMP's thread count is per OS thread: a pool thread starts at all cores
    with torch.no_grad():      # grad mode is per thread too: the pool's threads start with it on
        return branch.forward_group(tokens, g)


def forked(backbone: torch.nn.Module, pool: ThreadPoolExecutor) -> GroupFn:
    """A ``forward_group`` running each branch's blocks in ``pool`` (inference only)."""
    def run(states: list[Tokens], g: int) -> list[Tokens]:
        futures = [pool.submit(_group, br, t, g) for br, t in zip(backbone.branches, states)]
        return [f.result() for f in futures]
    return run


def streamed(backbone: torch.nn.Module, device: torch.device) -> GroupFn:
    """A ``forward_group`` queuing branch i's blocks on stream i (branch 0 on the current stream).

    Each side stream first waits for the current one (its input tokens are ready), the current
    stream then waits for all of them (the interactions read every branch). Tokens made on a side
    stream are marked as used by the current one, so the caching allocator does not hand their
    memory to the side stream again before the current stream is done with them."""
    mod = torch.get_device_module(device.type)
    side = [mod.Stream() for _ in backbone.branches[1:]]

    def run(states: list[Tokens], g: int) -> list[Tokens]:
        main = mod.current_stream()
        outs = [backbone.branches[0].forward_group(states[0], g)]
        for br, t, s in zip(backbone.branches[1:], states[1:], side):
            s.wait_stream(main)
            with mod.stream(s):
                outs.append(br.forward_group(t, g))
        for s in side:
            main.wait_stream(s)
        if device.type == "cuda":
            for t in outs[1:]:
                for v in (t.x, t.cls):
                    if v is not None:
                        v.record_stream(main)
        return outs
    return run


@contextlib.contextmanager
def scheduled(backbone: torch.nn.Module, group_fn: GroupFn) -> Iterator[None]:
    """``backbone.forward_group`` replaced by ``group_fn`` for the duration (on this instance only)."""
    backbone.forward_group = group_fn
    try:
        yield
    finally:
        del backbone.forward_group


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
    fork = forked(model, pool)

    def fork_features(t: torch.Tensor) -> torch.Tensor:
        with scheduled(model, fork):
            return model.forward_features(t)

    with torch.no_grad():
        torch.set_num_threads(args.threads)
        ref = model.forward_features(x)
        torch.set_num_threads(1)
        out = fork_features(x)
        print(f"max |fork - intra| = {(out - ref).abs().max().item():.2e}")
        times = {}
        for _ in range(args.repeats):      # interleaved: one pass each per round
            for name, threads, fn in (("intra", args.threads, model.forward_features),
                                      ("fork", 1, fork_features)):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn(x)
                times.setdefault(name, []).append(time.perf_counter() - start)
    intra, fork_s = (statistics.median(times[k]) for k in ("intra", "fork"))
    print(f"{args.model} at {args.side} px, {args.threads} threads: intra {intra:.3f} s, fork {fork_s:.3f} s, "
          f"fork / intra {fork_s / intra:.3f}")


if __name__ == "__main__":
    main()
