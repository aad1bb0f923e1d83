"""Memory of the InternViT-6B family: loading without a second copy, activation checkpointing, and
DDP vs FSDP per-GPU model state.

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/internvit_memory.py {load,train,analytic,all}``.

* ``load``: peak memory of building ``internvit_6b_1024`` (depth reduced with ``--load-depth``, full
  3200 width) from a checkpoint, ordinary path (build the model, read the file, copy it in) vs
  ``piip.create_model(name, checkpoint=...)`` (meta-device build, memory-mapped file, tensor-by-tensor
  materialisation), for a safetensors file and an official-layout ``.pth``. Each measurement runs in a
  fresh process; reported: peak RSS (VmHWM) and the peak of anonymous memory (RssAnon, sampled every
  2 ms: the weights the process owns, excluding file pages the kernel can drop).
* ``train``: peak memory of one forward + backward of a reduced-depth PIIP-H6B (3200-wide
  InternViT-6B and 1280-wide MAE-H branches, ``--train-depths``, skip stride 1.5) at ``--img-size``, with
  and without activation checkpointing (``with_cp``), each in a fresh process; reported: peak RSS and the
  rise over the built model (activations + gradients).
* ``analytic``: per-GPU bytes of weights, gradients and AdamW moments of the full ``piip_h6b_1024_512``
  (+ the largest FSDP unit gathered) under DDP and FSDP for 8 and 16 GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

GIB = 1024 ** 3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonPeak:
    """Samples RssAnon in a thread (there is no kernel high-water mark for it)."""

    def __init__(self, period: float = 0.002) -> None:
        self.peak, self.period, self._stop = 0, period, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.period)

    def __enter__(self) -> "AnonPeak":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("RssAnon"))


def _child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- load
def _load_overrides(depth: int) -> dict:
    return {"branches": {"depth": depth}}


def child_write(kind: str, path: str, depth: int) -> dict:
    import torch
    import piip
    from piip.weights import save_state_dict, to_official_state_dict
    model = piip.create_model("internvit_6b_1024", **_load_overrides(depth))
    if kind == "safetensors":
        save_state_dict(model, path)
    else:
        torch.save({"state_dict": to_official_state_dict(model)}, path)
    return {"bytes": os.path.getsize(path), "params": sum(p.numel() for p in model.parameters())}


def child_load(mode: str, path: str, depth: int) -> dict:
    import piip
    from piip.registry import build_from_config, get_config
    from piip.weights import load_checkpoint
    with AnonPeak() as anon:
        t = time.perf_counter()
        if mode == "ordinary":  # what create_model did before: a materialised model + the file's tensors
            model = build_from_config(get_config("internvit_6b_1024", **_load_overrides(depth)))
            load_checkpoint(model, path)
        else:
            model = piip.create_model("internvit_6b_1024", checkpoint=path, **_load_overrides(depth))
        secs = time.perf_counter() - t
    return {"vmhwm": _status("VmHWM"), "anon_peak": anon.peak, "seconds": secs,
            "weights": sum(p.numel() * p.element_size() for p in model.parameters())}


def run_load(depth: int) -> None:
    print(f"load: internvit_6b_1024 with depth {depth} (3200 wide), fresh process per row")
    print(f"{'file':<12} {'path':<10} {'weights':>9} {'peak RSS':>9} {'peak anon':>10} {'time':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name in (("safetensors", "model.safetensors"), ("official", "official.pth")):
            path = os.path.join(tmp, name)
            _child(["write", kind, path, str(depth)])
            for mode in ("ordinary", "meta"):
                r = _child(["load", mode, path, str(depth)])
                print(f"{kind:<12} {mode:<10} {r['weights'] / GIB:8.2f}G {r['vmhwm'] / GIB:8.2f}G "
                      f"{r['anon_peak'] / GIB:9.2f}G {r['seconds']:6.1f}s", flush=True)
            os.remove(path)


# ---------------------------------------------------------------------------- train step
def _train_overrides(depths: tuple[int, int], img: int, with_cp: bool) -> dict:
    dh, d6 = depths
    g = 2  # interaction groups
    cut = lambda d: [[i * d // g, (i + 1) * d // g - 1] for i in range(g)]  # noqa: E731
    return {"img_size": img, "branches": [{"depth": dh, "interaction_groups": cut(dh), "with_cp": with_cp},
                                          {"depth": d6, "interaction_groups": cut(d6), "with_cp": with_cp}]}


def child_train(with_cp: bool, dh: int, d6: int, img: int) -> dict:
    import torch
    import piip
    torch.manual_seed(0)
    model = piip.create_model("piip_h6b_1024_512", **_train_overrides((dh, d6), img, with_cp)).train()
    x = torch.randn(1, 3, img, img)
    base = _status("VmRSS")
    t = time.perf_counter()
    out = model(x)
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    secs = time.perf_counter() - t
    return {"vmhwm": _status("VmHWM"), "base": base, "seconds": secs,
            "params": sum(p.numel() for p in model.parameters())}


def run_train(depths: tuple[int, int], img: int) -> None:
    print(f"train: piip_h6b_1024_512, MAE-H depth {depths[0]}, InternViT-6B depth {depths[1]}, input {img}px "
          f"(6B branch at {img // 2}px), batch 1, forward + backward, fresh process per row")
    print(f"{'with_cp':<8} {'params':>8} {'built':>8} {'peak RSS':>9} {'rise':>8} {'rise - grads':>13} {'time':>7}")
    for cp in (False, True):
        r = _child(["train", str(int(cp)), str(depths[0]), str(depths[1]), str(img)])
        rise = r["vmhwm"] - r["base"]
        print(f"{str(cp):<8} {r['params'] / 1e9:7.2f}B {r['base'] / GIB:7.2f}G {r['vmhwm'] / GIB:8.2f}G "
              f"{rise / GIB:7.2f}G {(rise - 4 * r['params']) / GIB:12.2f}G {r['seconds']:6.1f}s", flush=True)


# ---------------------------------------------------------------------------- analytic
def run_analytic(name: str = "piip_h6b_1024_512") -> None:
    """Model state per GPU. Mixed precision as piip's FSDP: float32 master weights, gradients and AdamW
    moments (16 B/param), units gathered in bf16 for compute (2 B/param). DDP keeps all of it on every
    GPU; FSDP divides it by the GPU count and adds the gathered units (the current and the prefetched
    next one, plus the largest unit's float32 gradients before its reduce-scatter)."""
    from piip.complexity import _fast_meta_init
    from piip.engine.fsdp import fsdp_units
    from piip.registry import build_from_config, get_config
    with _fast_meta_init():
        model = build_from_config(get_config(name))
    total = sum(p.numel() for p in model.parameters())
    units = fsdp_units(model)
    sizes = [(sum(p.numel() for p in u.parameters()), type(u).__name__) for u in units]
    biggest, kind = max(sizes)
    block = max(n for n, k in sizes if k == "Block")
    root = total - sum(sum(p.numel() for p in u.parameters()) for u in units)
    state = 16 * total
    print(f"analytic: {name} backbone as built, {total / 1e9:.3f}B parameters, {len(units)} FSDP units "
          f"(largest {biggest / 1e6:.0f}M: the {kind}; an InternViT-6B block {block / 1e6:.0f}M), "
          f"root unit {root / 1e6:.1f}M; "
          "activations not included")
    print(f"{'strategy':<10} {'GPUs':>4} {'weights+grads+AdamW':>20} {'gathered units':>15} {'total/GPU':>10}")
    for n in (8, 16):
        print(f"{'DDP':<10} {n:>4} {state / GIB:19.1f}G {0:14.1f}G {state / GIB:9.1f}G")
        gathered = 2 * 2 * biggest + 4 * biggest + 4 * root
        print(f"{'FSDP':<10} {n:>4} {state / n / GIB:19.1f}G {gathered / GIB:14.1f}G "
              f"{(state / n + gathered) / GIB:9.1f}G")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        what, rest = sys.argv[2], sys.argv[3:]
        if what == "write":
            r = child_write(rest[0], rest[1], int(rest[2]))
        elif what == "load":
            r = child_load(rest[0], rest[1], int(rest[2]))
        else:
            r = child_train(bool(int(rest[0])), int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(r))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["load", "train", "analytic", "all"])
    p.add_argument("--load-depth", type=int, default=4, help="InternViT-6B blocks in the load benchmark")
    p.add_argument("--train-depths", type=int, nargs=2, default=[2, 3], metavar=("MAE_H", "6B"))
    p.add_argument("--img-size", type=int, default=512)
    a = p.parse_args()
    if a.what in ("load", "all"):
        run_load(a.load_depth)
    if a.what in ("train", "all"):
        run_train(tuple(a.train_depths), a.img_size)
    if a.what in ("analytic", "all"):
        run_analytic()


if __name__ == "__main__":
    main()
