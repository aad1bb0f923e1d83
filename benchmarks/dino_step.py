"""DINO training-step time and peak memory on PIIP-TSB vs ViTDet-B backbones, side by side (CPU).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/dino_step.py --setting tiny
    PYTHONPATH=src python benchmarks/dino_step.py --setting small --threads 2 --steps 3

Each (setting, backbone) runs in its own fresh process: build the detector (random weights), one
warm-up step, then ``--steps`` timed steps of forward + backward + AdamW on one image with 6
random boxes (denoising on); the median step time is reported, and the process's peak RSS (VmHWM).
The two backbones keep the papers' input ratio (PIIP-TSB 1120 : ViTDet-B 1024) at a smaller scale:

* ``tiny``: 32-wide, 1-block branches (PIIP-TSB 224/179/90 vs ViTDet 192 px), DINO 32
  wide with 2 + 2 layers and 30 queries: a seconds-long sanity run;
* ``small``: the real backbone widths and depths at half the papers' resolution (PIIP-TSB
  560/448/224 vs ViTDet-B 512) and the full DINO head (256 wide, 6 + 6 layers, 900 queries,
  100 denoising queries).

Both backbones return only the maps DINO reads (strides 8/16/32). Deformable attention uses the
automatic choice; the implementations the step actually ran (backbone and DINO head) are printed
with the results.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

BACKBONES = {"PIIP-TSB": ("piip_tsb_1120_896_448", 1120), "ViTDet-B": ("vitdet_b_1024", 1024)}
TINY_BRANCH = {"embed_dim": 32, "num_heads": 2, "depth": 1}
SETTINGS = {
    # finest-branch resolution of PIIP-TSB; ViTDet-B gets it x 1024 / 1120
    "tiny": dict(piip_size=224, backbone=dict(branches=TINY_BRANCH, deform_num_heads=2),
                 head=dict(num_queries=30, transformer_dim=32, transformer_heads=2, transformer_ffn=64,
                           enc_layers=2, dec_layers=2, dn_queries=12)),
    "small": dict(piip_size=560, backbone={}, head={}),
}


def run_one(setting: str, label: str, steps: int, threads: int) -> dict:
    """Runs in the child process: build, warm up, time ``steps`` steps; returns the measurements."""
    import importlib

    import torch

    from piip.runtime import tune_malloc
    from piip.tasks.detection import DetectorConfig, build_detector
    tune_malloc()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, ref = BACKBONES[label]
    s = SETTINGS[setting]
    size = int(s["piip_size"] * ref / 1120 // 16 * 16)
    model = build_detector(name, 80, "dino", DetectorConfig(**s["head"]), img_size=size, pyramid_levels=[1, 2, 3],
                           **s["backbone"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    h = size * 3 // 4
    image = torch.rand(3, h, size, generator=g)
    xy = torch.rand(6, 2, generator=g) * torch.tensor([size * 0.7, h * 0.7])
    wh = (torch.rand(6, 2, generator=g) * 0.25 + 0.05) * torch.tensor([size, h])
    target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 81, (6,), generator=g)}
    deform = importlib.import_module("piip.ops.ms_deform_attn")   # the module (piip.ops exports the function)
    used: set[str] = set()
    select = deform._select_impl

    def recording(impl, value, loc):   # which implementation each call of the step picks
        name = select(impl, value, loc)
        used.add(name)
        return name
    deform._select_impl = recording
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = sum(model([image], [target]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    return {"backbone": label, "model": name, "input": f"{size}x{h}", "params_m": round(
        sum(p.numel() for p in model.parameters()) / 1e6, 1), "step_s": round(statistics.median(times), 3),
        "peak_rss_mb": round(int(hwm) / 1024), "deform_impl": " + ".join(sorted(used))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.setting, args.child, args.steps, args.threads)))
        return 0
    rows = []
    for label in BACKBONES:
        out = subprocess.run([sys.executable, __file__, "--setting", args.setting, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--child", label],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"DINO train step, setting {args.setting!r}, {args.threads} thread(s), median of {args.steps} steps, "
          f"batch 1")
    print("| backbone | model | input | params | step (s) | peak RSS (MB) | deform attn |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['model']} | {r['input']} | {r['params_m']}M | {r['step_s']} | "
              f"{r['peak_rss_mb']} | {r['deform_impl']} |")
    a, b = rows
    print(f"PIIP-TSB / ViTDet-B: step time x{a['step_s'] / b['step_s']:.2f}, peak memory "
          f"x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
