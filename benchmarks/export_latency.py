"""onnxruntime vs eager PyTorch latency of exported backbones, side by side in one run.

Each model is exported with :func:`piip.export.export_model` (ONNX, dynamic batch / H / W,
checked against eager at two other sizes), then eager and onnxruntime are timed *interleaved*
(eager, ort, eager, ort, ...) on the same inputs so that load from other processes hits both
alike; the ratio eager / ort is what to read on a shared machine, not the absolute times.

Run: ``PYTHONPATH=src python benchmarks/export_latency.py [--models piip_tsb_1568_1120_672 vitdet_b_1024]
[--size 512] [--repeats 5] [--threads 2] [--out-dir /tmp]``. ``--depth N`` / ``--width-div K``
shrink the models (a quick look; the documented numbers use the full models).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import piip
from piip.export import export_model, relative_error


def build(name: str, size: int, depth: int | None) -> torch.nn.Module:
    kw: dict = {"img_size": size}
    if depth is not None:
        cfg = piip.get_config(name)
        kw["branches"] = [dict(depth=depth, interaction_groups=[[i, i] for i in range(depth)],
                               window_sizes=b.window_sizes[:depth]) for b in cfg.branches]
        if cfg.out_groups:
            kw["out_groups"] = None
    torch.manual_seed(0)
    return piip.create_model(name, **kw).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["piip_tsb_1568_1120_672", "vitdet_b_1024"])
    ap.add_argument("--size", type=int, default=512, help="input side (finest branch), a multiple of 32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--depth", type=int, default=None, help="blocks per branch (default: the model's)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="piip-export-bench-")
    x = torch.rand(1, 3, args.size, args.size)
    runs = {}
    for name in args.models:
        model = build(name, args.size, args.depth)
        path = os.path.join(out_dir, f"{name}.onnx")
        t = time.perf_counter()
        res = export_model(model, "onnx", path, args.size)
        print(f"{name}: exported in {time.perf_counter() - t:.0f} s, check errors "
              f"{[f'{e:.1e}' for _, e in res.checks]}", flush=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}
        with torch.no_grad():
            want = list(model(x).values())
        got = [torch.from_numpy(o) for o in sess.run(None, feed)]
        err = max(relative_error(g, w) for g, w in zip(got, want))

        def eager(model=model) -> None:
            with torch.no_grad():
                model(x)
        runs[name] = (eager, lambda sess=sess, feed=feed: sess.run(None, feed), err)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats + 1):           # first round warms up, not counted
        for name, (eager, onnx_run, _) in runs.items():
            for kind, fn in (("eager", eager), ("ort", onnx_run)):
                t = time.perf_counter()
                fn()
                times.setdefault((name, kind), []).append(time.perf_counter() - t)
    print(f"\n{args.size}x{args.size}, batch 1, {args.threads} threads, median of {args.repeats} interleaved runs "
          f"(torch {torch.__version__}, onnxruntime {ort.__version__})")
    print(f"{'model':28s} {'eager ms':>10s} {'ort ms':>10s} {'eager/ort':>10s} {'rel. err':>9s}")
    for name, (_, _, err) in runs.items():
        e = statistics.median(times[(name, "eager")][1:]) * 1e3
        o = statistics.median(times[(name, "ort")][1:]) * 1e3
        print(f"{name:28s} {e:10.1f} {o:10.1f} {e / o:10.2f} {err:9.1e}")


if __name__ == "__main__":
    main()
