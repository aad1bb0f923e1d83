"""Side-by-side timings of the small-op rewrites piip makes for CPU speed, each against the plain op.

Run::

    PYTHONPATH=src python benchmarks/micro_ops.py            # one thread, median of 7 wall-clock runs (wall)
    PYTHONPATH=src python benchmarks/micro_ops.py --rows locations dwconv conv3x3 fused

Each row times the plain PyTorch formulation and piip's at the shapes a PIIP-TSB 1120 forward
produces, in one run, and prints their ratio and the largest difference of their outputs:

* ``softmax``: the deformable attention's 4-wide softmax (``softmax_last``);
* ``locations``: the pixel coordinates of the sampling points, through the locations (``addcdiv``
  of ``ref + offsets / (W, H)``, then ``loc * size - 0.5``) against the point form's
  ``offset + (ref * size - 0.5)`` (``ms_deform_attn_points``, ``deform_fused._from_offsets``);
* ``dwconv``: the ConvFFN's depthwise conv on its channels-last token map, with the weight's default
  strides against a channels-last weight, back to tokens (``DWConv``, ``layers/conv.py``);
* ``conv3x3``: the same for the detection merge's 3x3 convs (output compared in either layout);
* ``winograd``: wide channels-last 3x3 convs, oneDNN's direct convolution against Winograd's
  F(2x2, 3x3) (``piip.ops.winograd``), whose output differs by float rounding;
* ``fused``: ``fused`` deformable sampling without a gradient, the training forward (``_FusedLevel``:
  in-map mask) against the inference path (``_sample_no_grad``: clamped cells, two-pixel border).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

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


# PIIP-TSB 1120's four deformable shapes: (query tokens, value map side, value width per head)
_EDGES = ((4900, 56, 6), (3136, 70, 12), (3136, 28, 12), (784, 56, 24))


def location_rows() -> list[tuple[str, Callable, Callable]]:
    from piip.ops import deform_fused as df
    rows = []
    for tokens, side, _ in _EDGES[:2]:
        ref = torch.rand(1, tokens, 1, 2)
        off = torch.randn(1, tokens, 16, 1, 4, 2) * 3
        norm = torch.tensor([float(side), float(side)]).view(1, 1, 2)
        centre = ref[:, :, 0] * side - 0.5

        def through_locations(r=ref[:, :, None, :, None, :], o=off, n=norm, side=side):
            return df.pixel_coords(torch.addcdiv(r, o, n)[:, :, :, 0], side, side)

        def from_offsets(o=off[:, :, :, 0], c=centre[:, :, None, None]):
            return torch.add(o[..., 0], c[..., 0]), torch.add(o[..., 1], c[..., 1])
        rows.append((f"pixel coords (1, {tokens}, 16, 1, 4, 2)", through_locations, from_offsets))
    return rows


def dwconv_rows() -> list[tuple[str, Callable, Callable]]:
    rows = []
    for c, side in ((48, 70), (96, 56), (192, 28)):     # ConvFFN hidden width at each query map
        x = torch.randn(1, side * side, c).transpose(1, 2).reshape(1, c, side, side)   # channels-last view
        w, b = torch.randn(c, 1, 3, 3), torch.randn(c)

        def run(weight, x=x, b=b, c=c, side=side):
            return F.conv2d(x, weight, b, 1, 1, 1, c).permute(0, 2, 3, 1).reshape(1, side * side, c)
        rows.append((f"depthwise conv (1, {c}, {side}, {side}) to tokens", lambda w=w, run=run: run(w),
                     lambda w=w, run=run: run(w.to(memory_format=torch.channels_last))))
    return rows


def conv3x3_rows() -> list[tuple[str, Callable, Callable]]:
    """The detection merge's 3x3 convs (branch width -> 768) on channels-last branch maps (layers/conv.py)."""
    rows = []
    for c, side in ((192, 70), (384, 56), (768, 28)):
        x = torch.randn(1, side * side, c).transpose(1, 2).reshape(1, c, side, side)
        w = torch.randn(768, c, 3, 3) * 0.05
        rows.append((f"conv 3x3 {c}->768 at {side}x{side}", lambda x=x, w=w: F.conv2d(x, w, None, 1, 1),
                     lambda x=x, w=w.to(memory_format=torch.channels_last): F.conv2d(x, w, None, 1, 1)))
    return rows


def winograd_rows() -> list[tuple[str, Callable, Callable]]:
    """Channels-last 3x3 convs, oneDNN's direct convolution (channels-last weight) against
    ``piip.ops.winograd.conv3x3``: the merge's shapes (PIIP-TSB 1120), the UperNet head's (PIIP-TSB
    896 segmentor: 512 -> 512 FPN convs, the 2048 -> 512 fuse on a quarter of its 224x224 map, the
    pooling bottleneck), and narrower ones below the width the automatic choice needs
    (``MIN_CHANNELS``): a 192 -> 768 merge conv, 256-wide detection-FPN convs, 192 -> 192."""
    from piip.ops import winograd
    rows = []
    for c, co, side in ((768, 768, 70), (768, 768, 56), (768, 768, 28), (384, 768, 56), (512, 512, 112),
                        (2048, 512, 112), (2816, 512, 28), (192, 768, 70), (256, 256, 280), (256, 256, 70),
                        (192, 192, 70)):
        x = torch.randn(1, side * side, c).transpose(1, 2).reshape(1, c, side, side)
        w = torch.randn(co, c, 3, 3) * (9 * c) ** -0.5
        u = winograd.filter_transform(w)         # kept by the layer: made here outside the timing
        rows.append((f"conv 3x3 {c}->{co} at {side}x{side}, Winograd",
                     lambda x=x, w=w.to(memory_format=torch.channels_last): F.conv2d(x, w, None, 1, 1),
                     lambda x=x, w=w, u=u: winograd.conv3x3(x, w, None, transformed=u)))
    return rows


def fused_rows() -> list[tuple[str, Callable, Callable]]:
    from piip.ops import deform_fused as df

    class _Ctx:                                     # what autograd.Function.forward is handed
        def save_for_backward(self, *tensors):
            pass
    rows = []
    for tokens, side, d in _EDGES:
        value = torch.randn(1, side, side, 16, d)
        loc = torch.rand(1, tokens, 16, 4, 2) * 1.1 - 0.05       # some samples off the map
        attn = torch.rand(1, tokens, 16, 4)
        rows.append((f"fused no-grad {tokens} queries, {side}x{side}x16x{d}",
                     lambda v=value, l=loc, a=attn: df._FusedLevel.forward(_Ctx(), v, l, a),
                     lambda v=value, l=loc, a=attn, s=side: df._sample_no_grad(v, *df.pixel_coords(l, s, s), a)))
    return rows


ROWS = {"softmax": softmax_rows, "locations": location_rows, "dwconv": dwconv_rows, "conv3x3": conv3x3_rows,
        "winograd": winograd_rows, "fused": fused_rows}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, wall time, median of 7\n")
    print(f"{'op':44s} {'plain ms':>9s} {'piip ms':>9s} {'piip/plain':>10s} {'max diff':>9s}")
    for name, plain, ours in (row for key in args.rows for row in ROWS[key]()):
        a, b = plain(), ours()
        diff = max((x - y).abs().max().item() for x, y in (zip(a, b) if isinstance(a, tuple) else [(a, b)]))
        tp, to = _time(plain), _time(ours)
        print(f"{name:44s} {tp * 1e3:9.2f} {to * 1e3:9.2f} {to / tp:10.2f} {diff:9.1e}")


if __name__ == "__main__":
    main()
