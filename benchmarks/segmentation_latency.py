"""Eval-mode latency of the PIIP-TSB 896/448/336 UperNet segmentor against ViT-B 640 UperNet,
measured in one run (the paper's ADE20K pair: 118G vs 159G backbone FLOPs, ratio 0.74).

Run: ``PYTHONPATH=src python benchmarks/segmentation_latency.py [--repeats 3] [--threads N]
[--device cpu|cuda] [--scale 1.0]``. Both segmentors (UperNet 512, FCN aux head unused in eval)
are built at random init; each runs one whole-window forward on a crop of its own size
(896 / 640 px, times ``--scale``), warm-up first, then alternating, the median reported.
FLOPs are counted with ``torch.utils.flop_counter`` on the warm-up pass (matmuls, convolutions,
attention; element-wise ops and resizing not counted), once for the backbone alone and once for
the whole segmentor. Prints a table and the latency / FLOP ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_count import counted_macs

from piip.runtime import tune_malloc
from piip.tasks.segmentation import SegmentorConfig, build_segmentor

PAIR = (("piip_tsb_896_448_336_seg", 896), ("vit_b_640_seg", 640))
PAPER = {"piip_tsb_896_448_336_seg": 118.0, "vit_b_640_seg": 159.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="input size factor (multiples of 16 are kept)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="keep glibc's default allocator settings (piip's CLI tunes them, see piip.runtime)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_malloc else tune_malloc()
    device = torch.device(args.device)
    models, inputs, flops, bb_flops, times = {}, {}, {}, {}, {}
    for name, size in PAIR:
        s = max(16, int(round(size * args.scale / 16)) * 16)
        torch.manual_seed(0)
        overrides = {"img_size": s} if s != size else {}
        models[name] = build_segmentor(name, 150, SegmentorConfig(channels=512, aux_channels=256),
                                       **overrides).eval().to(device)
        inputs[name] = torch.rand(1, 3, s, s, device=device)
        times[name] = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for name, m in models.items():         # warm-up + FLOPs
            flops[name] = counted_macs(lambda: m(inputs[name]))          # MACs, the papers' "FLOPs"
            bb_flops[name] = counted_macs(lambda: m.backbone(inputs[name]))
        for _ in range(args.repeats):
            for name, m in models.items():
                _sync(device)
                t = time.perf_counter()
                m(inputs[name])
                _sync(device)
                times[name].append(time.perf_counter() - t)
    print(f"device {device}, threads {torch.get_num_threads()}, repeats {args.repeats}, bf16 {args.bf16}, "
          f"malloc tuned: {tuned}")
    print(f"{'segmentor':28s} {'input':>6s} {'backbone GMACs':>15s} {'total GMACs':>12s} {'paper G':>8s} {'median s':>9s}")
    for name, _ in PAIR:
        print(f"{name:28s} {inputs[name].shape[-1]:6d} {bb_flops[name] / 1e9:15.1f} {flops[name] / 1e9:12.1f} "
              f"{PAPER[name]:8.0f} {statistics.median(times[name]):9.3f}")
    (a, _), (b, _) = PAIR
    lat = statistics.median(times[a]) / statistics.median(times[b])
    print(f"PIIP/ViT-B: latency {lat:.2f}, backbone MACs {bb_flops[a] / bb_flops[b]:.2f}, "
          f"total MACs {flops[a] / flops[b]:.2f} (paper backbone FLOPs 118/159 = 0.74)")


if __name__ == "__main__":
    main()
