"""The papers' protocol in miniature, on real images (Fashion-MNIST): pretrain three ViTs of
increasing size as classifiers ("ImageNet"), then build Mask R-CNN detectors from them on scenes of
pasted garments ("COCO"), and compare a single-branch ViTDet-style baseline with PIIP pyramids.

    apt-get install dataset-fashion-mnist          # the four IDX files, no download by piip
    python benchmarks/evidence.py --budget full --jobs 2   # 2.8 core-hours measured: ~1.5 h on 2 cores
    python benchmarks/evidence.py --budget smoke            # minutes: checks the pipeline

Everything runs through piip's user-facing commands (``piip train classification``, ``piip convert
timm``, ``piip train detection``), in this process, or with ``--jobs 2`` in two child processes of
one thread each. Steps are cached in ``--out`` (a finished step is not run again; ``--force``
re-runs), so an interrupted run continues where it stopped, and ``--only`` runs a subset.

Models (same depth 6, patch 16; widths 48 / 96 / 192 = the T/S/B width ratios 1/4, 1/2, 1):
- ``vitdet_b``: the pretrained B alone at the scene resolution (256), ViTDet simple pyramid;
- ``piip_low``: PIIP-TSB from the pretrained T/S/B at 272/208/112 (~55 % of the baseline's FLOPs,
  the papers' 1120/896/448-vs-1024 point);
- ``piip_equal``: PIIP-TSB at 352/272/128 (~equal FLOPs);
- ``piip_low_random``: ``piip_low`` from random weights (what pretraining contributes).
Same detector heads, schedule, learning rate, seed and data for all four.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from piip.cli import main as piip  # noqa: E402
from piip.complexity import count_config  # noqa: E402
from piip.data.fashion_mnist import load_fashion_mnist, make_scenes, write_image_folder  # noqa: E402
from piip.evaluation import coco_evaluate  # noqa: E402
from piip.registry import get_config  # noqa: E402

DEPTH = 6
SIZES = {"T": (48, 3), "S": (96, 3), "B": (192, 6)}
PRETRAIN_PX = 64  # 28 px garments upsampled: a 4x4 token grid, like DeiT's 14x14 at 224
BUDGETS: dict[str, dict[str, Any]] = {
    # per_class: classification images per class (train split); cls_epochs: pretraining epochs
    "smoke": dict(per_class=100, val_per_class=20, cls_epochs={"T": 1, "S": 1, "B": 1}, scenes=(16, 8),
                  det_epochs=1),
    "full": dict(per_class=3000, val_per_class=1000, cls_epochs={"T": 4, "S": 4, "B": 4}, scenes=(400, 200),
                 det_epochs=8),
}
DET_MODELS = {  # name: (branch sizes, resolutions, pretrained)
    "vitdet_b": ("B", (256,), True),
    "piip_low": ("TSB", (272, 208, 112), True),
    "piip_equal": ("TSB", (352, 272, 128), True),
    "piip_low_random": ("TSB", (272, 208, 112), False),
}
# run only when named in --only: is a narrow finest branch what costs PIIP its small objects here?
ABLATIONS = {"piip_ssb_low": ("SSB", (256, 160, 96), True)}  # the S ViT also at the finest resolution, 60 %


def branch(size: str, res: int) -> dict[str, Any]:
    dim, heads = SIZES[size]
    return {"embed_dim": dim, "num_heads": heads, "depth": DEPTH, "img_size": res, "pos_grid": PRETRAIN_PX // 16,
            "window_sizes": [0] * DEPTH, "drop_path": 0.1}


def det_overrides(sizes: str, res: tuple[int, ...]) -> dict[str, Any]:
    if len(sizes) == 1:
        return {"branches": [{**branch(sizes, res[0]), "interaction_groups": [[0, DEPTH - 1]]}]}
    groups = [[0, 1], [2, 3], [4, 5]]  # three interaction units, as every-4-blocks would be at depth 12
    return {"deform_num_heads": 6, "branches": [{**branch(s, r), "interaction_groups": groups}
                                                for s, r in zip(sizes, res)]}


def base_model(sizes: str) -> str:
    return "vitdet_b_1024" if len(sizes) == 1 else "piip_tsb_1120_896_448"


def run(argv: list[str]) -> None:
    print("$ piip " + " ".join(a if " " not in a and "{" not in a else f"'{a}'" for a in argv), flush=True)
    rc = piip(argv)
    if rc:
        raise SystemExit(f"step failed (exit {rc}): piip {' '.join(argv)}")


def step_data(args, b) -> dict[str, str]:
    paths = {"cls": os.path.join(args.out, "fmnist_cls"), "scenes": os.path.join(args.out, "scenes")}
    done = os.path.join(args.out, "data.done")
    if os.path.exists(done) and (not args.force or args.child):  # a --jobs 2 child never rewrites the data
        return paths
    t0 = time.time()
    tr_x, tr_y = load_fashion_mnist("train", args.fmnist_root)
    te_x, te_y = load_fashion_mnist("test", args.fmnist_root)
    write_image_folder(os.path.join(paths["cls"], "train"), tr_x, tr_y, b["per_class"])
    write_image_folder(os.path.join(paths["cls"], "val"), te_x, te_y, b["val_per_class"])
    n_train, n_val = b["scenes"]
    make_scenes(paths["scenes"], "train", tr_x, tr_y, n_train, size=args.scene_size, seed=1)
    make_scenes(paths["scenes"], "val", te_x, te_y, n_val, size=args.scene_size, seed=2)
    open(done, "w").write(f"{time.time() - t0:.1f}\n")
    print(f"data written in {time.time() - t0:.0f}s to {args.out}")
    return paths


def step_pretrain(args, b, size: str, cls_dir: str) -> dict[str, Any]:
    out = os.path.join(args.out, f"pretrain_{size}")
    timm_file = os.path.join(args.out, f"vit_{size.lower()}_fmnist.safetensors")
    result = os.path.join(out, "result.json")
    if os.path.exists(result) and os.path.exists(timm_file) and not args.force:
        return json.load(open(result))
    epochs = b["cls_epochs"][size]
    t0 = time.time()
    run(["train", "classification", "--model", "deit_b_224_cls", "--img-size", str(PRETRAIN_PX),
         "--override", json.dumps({"branches": {k: v for k, v in branch(size, PRETRAIN_PX).items()
                                                if k not in ("img_size", "drop_path")}}),
         "--data", cls_dir, "--recipe", "scratch", "--epochs", str(epochs), "--batch-size", "128",
         "--lr", "2e-3", "--warmup-epochs", "0.5", "--min-lr", "1e-5", "--drop-path", "0.05",
         "--auto-augment", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0.1",
         "--ema-decay", "0", "--crop-scale", "0.35", "--workers", str(args.workers), "--eval-every", str(epochs),
         "--seed", str(args.seed), "--output-dir", out, "--log-every", "100"])
    train_s = time.time() - t0
    run(["convert", "timm", os.path.join(out, "checkpoint.pt"), "--out", timm_file])
    ev = json.load(open(os.path.join(out, f"eval_epoch{epochs}.json")))
    res = {"size": size, "width": SIZES[size][0], "epochs": epochs, "top1": ev["top1"], "top5": ev["top5"],
           "train_s": round(train_s, 1), "file": timm_file}
    json.dump(res, open(result, "w"), indent=1)
    return res


def step_detect(args, b, name: str, scenes: str, pretrained: dict[str, str]) -> dict[str, Any]:
    sizes, res, use_pretrained = {**DET_MODELS, **ABLATIONS}[name]
    out = os.path.join(args.out, f"det_{name}")
    result = os.path.join(out, "result.json")
    if os.path.exists(result) and not args.force:
        r = json.load(open(result))
        if "bbox_agnostic" not in r:  # results from before this column existed
            ep = r.get("epochs", args.det_epochs or b["det_epochs"])
            r["bbox_agnostic"] = agnostic_ap(scenes, os.path.join(out, f"eval_epoch{ep}"))
            json.dump(r, open(result, "w"), indent=1)
        return r
    ov = det_overrides(sizes, res)
    cx = count_config(get_config(base_model(sizes), **ov))
    epochs = args.det_epochs or b["det_epochs"]
    argv = ["train", "detection", "--model", base_model(sizes), "--override", json.dumps(ov),
            "--train-ann", os.path.join(scenes, "train.json"), "--train-images", os.path.join(scenes, "train"),
            "--val-ann", os.path.join(scenes, "val.json"), "--val-images", os.path.join(scenes, "val"),
            "--epochs", str(epochs), "--batch-size", "4", "--lr", str(args.det_lr), "--layer-decay", str(args.layer_decay),
            "--warmup-iters", "50", "--lr-steps", str(max(1, epochs * 8 // 12)), str(max(1, epochs * 11 // 12)),
            "--clip-grad", "5", "--fpn-channels", "64", "--box-head-dim", "256", "--mask-head-dim", "64",
            "--anchor-scale", "3", "--rpn-batch-size", "128", "--roi-batch-size", "128", "--pad-divisor", "32",
            "--eval-every", str(epochs), "--workers", str(args.workers), "--seed", str(args.seed),
            "--output-dir", out, "--log-every", "25"]
    if use_pretrained:
        argv += ["--pretrained-branches", *[pretrained[s] for s in sizes]]
    t0 = time.time()
    run(argv)
    train_s = time.time() - t0
    metrics = json.load(open(os.path.join(out, f"eval_epoch{epochs}", "metrics.json")))
    r = {"name": name, "branches": f"{'/'.join(sizes)} at {'/'.join(map(str, res))}", "pretrained": use_pretrained,
         "backbone_gflops": round(cx.flops / 1e9, 4), "backbone_params_M": round(cx.params / 1e6, 3),
         "train_s": round(train_s, 1), "epochs": epochs, "bbox": metrics["bbox"], "segm": metrics["segm"],
         "bbox_agnostic": agnostic_ap(scenes, os.path.join(out, f"eval_epoch{epochs}"))}
    json.dump(r, open(result, "w"), indent=1)
    return r


def agnostic_ap(scenes: str, eval_dir: str) -> dict[str, float]:
    """Class-agnostic box AP / AP50: separates finding garments from telling shirt from T-shirt."""
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(os.path.join(scenes, "val.json"))
    dets = json.load(open(os.path.join(eval_dir, "detections.json")))
    m = coco_evaluate(gt, dets, ["bbox"], use_cats=False)["bbox"]
    return {"AP": m["AP"], "AP50": m["AP50"]}


def report(args, pre: list[dict], det: list[dict]) -> str:
    lines = ["| pretrained ViT | width | epochs | top-1 (FMNIST test) | train s |", "|---|---|---|---|---|"]
    lines += [f"| {p['size']} | {p['width']} | {p['epochs']} | {p['top1']:.2f} | {p['train_s']:.0f} |" for p in pre]
    lines += ["", "| model | branches (px) | pretrained | backbone GFLOPs | params (M) | box AP | AP50 | APs | APm | "
              "APl | mask AP | mask APs | mask APm | mask APl | class-agnostic box AP | train s |",
              "|" + "---|" * 16]
    for r in det:
        bb, sg = r["bbox"], r["segm"]
        lines.append(f"| {r['name']} | {r['branches']} | {'yes' if r['pretrained'] else 'no'} | "
                     f"{r['backbone_gflops']:.3f} | {r['backbone_params_M']:.2f} | {bb['AP']:.3f} | {bb['AP50']:.3f} | "
                     f"{bb['APs']:.3f} | {bb['APm']:.3f} | {bb['APl']:.3f} | {sg['AP']:.3f} | {sg['APs']:.3f} | "
                     f"{sg['APm']:.3f} | {sg['APl']:.3f} | "
                     f"{r['bbox_agnostic']['AP']:.3f} | {r['train_s']:.0f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    json.dump({"args": vars(args), "pretrain": pre, "detection": det},
              open(os.path.join(args.out, "results.json"), "w"), indent=1)
    plot(args, det)
    return table


def plot(args, det: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, task in zip(axes, ("bbox", "segm")):
        for r in det:  # a legend, not annotations: PIIP at equal FLOPs sits on top of the baseline
            marker = "s" if r["name"].startswith("vitdet") else ("x" if not r["pretrained"] else "o")
            ax.scatter(r["backbone_gflops"], r[task]["AP"], marker=marker, s=60, label=r["name"])
        ax.set_xlabel("backbone GFLOPs (paper convention)")
        ax.set_ylabel(f"{'box' if task == 'bbox' else 'mask'} AP (scenes val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Fashion-MNIST scenes, Mask R-CNN ({args.budget} budget)")
    fig.tight_layout()
    path = os.path.join(args.out, "ap_vs_gflops.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# two lanes of similar length (measured single-thread seconds: pretraining B ~ T + S; the detection
# runs pair the cheapest with the dearest)
LANES = [(["pretrain_B"], ["pretrain_T", "pretrain_S"]),
         (["vitdet_b", "piip_equal"], ["piip_low", "piip_low_random"])]


def run_lanes(args) -> None:
    """``--jobs 2``: each phase's two lanes as child processes of one thread each (data written
    before, report made after, by the caller)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, os.path.abspath(__file__), "--child", "--budget", args.budget, "--out", args.out,
            "--scene-size", str(args.scene_size), "--det-lr", str(args.det_lr), "--layer-decay", str(args.layer_decay),
            "--workers", str(args.workers), "--seed", str(args.seed)]
    base += ["--fmnist-root", args.fmnist_root] if args.fmnist_root else []
    base += ["--det-epochs", str(args.det_epochs)] if args.det_epochs else []
    base += ["--force"] if args.force else []
    for phase in LANES:
        procs = []
        for k, lane in enumerate(phase):
            log = open(os.path.join(args.out, f"lane{k + 1}_{lane[0]}.log"), "w")
            procs.append(subprocess.Popen([*base, "--only", *lane], env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"started {' '.join(lane)} (log {log.name})", flush=True)
        failed = [p.args for p in procs if p.wait() != 0]
        if failed:
            raise SystemExit(f"a lane failed: {failed[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    ap.add_argument("--out", default=None, help="work folder (default runs/evidence_<budget>)")
    ap.add_argument("--fmnist-root", default=None, help="folder with the IDX files (default: the Debian package's)")
    ap.add_argument("--scene-size", type=int, default=256)
    ap.add_argument("--det-epochs", type=int, default=None, help="detection epochs (default: the budget's)")
    ap.add_argument("--det-lr", type=float, default=1e-3)
    ap.add_argument("--layer-decay", type=float, default=0.9)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                    help="2: run the steps as two processes of one thread each (one per core), in two lanes")
    ap.add_argument("--only", nargs="+", default=None,
                    help=f"steps to run: data, pretrain_T/S/B, {', '.join(DET_MODELS)}, report (default: all); "
                         f"ablations, only when named: {', '.join(ABLATIONS)}")
    ap.add_argument("--force", action="store_true", help="re-run finished steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out or os.path.join("runs", f"evidence_{args.budget}")
    os.makedirs(args.out, exist_ok=True)
    b = BUDGETS[args.budget]
    want = set(args.only or ["data", *(f"pretrain_{s}" for s in "TSB"), *DET_MODELS, "report"])
    paths = step_data(args, b)
    if args.jobs == 2 and not args.only:
        run_lanes(args)
        # every step is cached now (--force was the children's to honour): gather and report below
        want, args.force = {"report"}, False
    pre = {s: step_pretrain(args, b, s, paths["cls"]) for s in "TSB"
           if f"pretrain_{s}" in want or ("report" in want and os.path.exists(os.path.join(args.out, f"pretrain_{s}",
                                                                                         "result.json")))}
    det = []
    files = {s: os.path.join(args.out, f"vit_{s.lower()}_fmnist.safetensors") for s in "TSB"}
    for name in [*DET_MODELS, *ABLATIONS]:
        if name in want or ("report" in want and os.path.exists(os.path.join(args.out, f"det_{name}", "result.json"))):
            det.append(step_detect(args, b, name, paths["scenes"], files))
    if "report" in want:
        print(report(args, list(pre.values()), det))


if __name__ == "__main__":
    main()
