"""Side-by-side timings of the small-op rewrites piip makes for CPU speed, each against the plain op.

Run::

    PYTHONPATH=src python benchmarks/micro_ops.py            # one thread, median of 7 wall-clock runs (wall)

Each row times the plain PyTorch formulation and piip's at the shapes a PIIP-TSB 1120 forward
produces, in one run, and prints their ratio and the largest difference of their outputs.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from piip.layers.deform_attn import softmax_last


def _time(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def softmax_rows() -> list[tuple[str, Callable, Callable]]:
    """Deformable attention weights: (1, tokens, 16 heads, 1 level x 4 points), forward and backward."""
    rows = []
    for tokens in (4900, 3136, 784):    # the 70x70, 56x56 and 28x28 query maps of PIIP-TSB 1120
        x = torch.randn(1, tokens, 16, 4)
        rows.append((f"softmax (1, {tokens}, 16, 4) forward", lambda x=x: F.softmax(x, -1),
                     lambda x=x: softmax_last(x)))
        xg = x.clone().requires_grad_()
        g = torch.randn_like(x)
        rows.append((f"softmax (1, {tokens}, 16, 4) forward+backward",
                     lambda xg=xg, g=g: torch.autograd.grad(F.softmax(xg, -1), xg, g)[0],
                     lambda xg=xg, g=g: torch.autograd.grad(softmax_last(xg), xg, g)[0]))
    return rows


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, wall time, median of 7\n")
    print(f"{'op':44s} {'plain ms':>9s} {'piip ms':>9s} {'piip/plain':>10s} {'max diff':>9s}")
    for name, plain, ours in softmax_rows():
        a, b = plain(), ours()
        diff = (a - b).abs().max().item()
        tp, to = _time(plain), _time(ours)
        print(f"{name:44s} {tp * 1e3:9.2f} {to * 1e3:9.2f} {to / tp:10.2f} {diff:9.1e}")


if __name__ == "__main__":
    main()
