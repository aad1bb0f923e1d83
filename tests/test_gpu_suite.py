"""benchmarks/gpu_suite.py: skips cleanly without CUDA, and its code paths run on CPU (--dry-run:
tiny shapes, Triton's interpreter) and write the JSON / markdown the docs quote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_suite = pytest.importorskip("gpu_suite")
branch_concurrency = pytest.importorskip("branch_concurrency")


def test_skips_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA" in out[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.heavy
def test_dry_run_writes_results(tmp_path):
    pytest.importorskip("triton", reason="the dry run checks the Triton kernels with its interpreter")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--no-compile",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["dry_run"] and res["card"].startswith("CPU")
    # (a) every dtype / shape agrees with the reference (float32 and bf16 inputs)
    assert {(r["shape"], r["dtype"]) for r in res["correctness"]} == {
        (s, d) for s in ("DINO encoder", "TSB S->T") for d in ("float32", "bfloat16")}
    assert all(r["ok"] for r in res["correctness"]), res["correctness"]
    # (b) every implementation timed on every shape, speed-ups relative to reference
    assert {r["impl"] for r in res["speed"]} == {"reference", "fused", "triton"}
    assert all(r["fwd_speedup"] == 1.0 for r in res["speed"] if r["impl"] == "reference")
    # (c) both model rows with their ratios
    assert [r["case"] for r in res["models"]] == ["tsb-1120-built", "tsb-1120-train"]
    assert all(r["eager_ratio"] > 0 and r["flops_ratio"] > 0 and r["dtype"] == "bfloat16" for r in res["models"])
    # (d) the schedules that run on CPU, equal to eager; graphs reported as not run
    sch = res["schedules"]
    assert [r["variant"] for r in sch["rows"]] == ["piip eager", "base eager", "piip streams"]
    assert sch["rows"][2]["rel_diff"] == 0.0 and "graphs" in sch["errors"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "DRY RUN" in md and "| TSB S->T | triton |" in md and "| tsb-1120-train |" in md
    assert "| piip streams |" in md


def test_schedules_replace_forward_group_for_their_block_only():
    """branch_concurrency's schedules (threads; streams, on CPU's no-op streams) give the default
    schedule's output, and the backbone's own forward_group is back after the block, also after an error."""
    from concurrent.futures import ThreadPoolExecutor

    import piip
    from conftest import tiny_overrides
    torch.manual_seed(0)
    model = piip.create_model("piip_tsb_1120_896_448", **tiny_overrides("piip_tsb_1120_896_448")).eval()
    x = torch.randn(1, 3, 64, 64)
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref = model(x)
        with ThreadPoolExecutor(2) as pool:
            for fn in (branch_concurrency.streamed(model, x.device), branch_concurrency.forked(model, pool)):
                calls = []

                def counted(states, g, fn=fn):
                    calls.append(g)
                    return fn(states, g)
                with branch_concurrency.scheduled(model, counted):
                    out = model(x)
                assert calls == list(range(model.num_groups))
                assert all(torch.equal(a, b) for a, b in zip(out.values(), ref.values()))
                assert "forward_group" not in vars(model)
        with pytest.raises(RuntimeError, match="boom"):
            with branch_concurrency.scheduled(model, lambda states, g: (_ for _ in ()).throw(RuntimeError("boom"))):
                model(x)
        assert "forward_group" not in vars(model)
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), ref.values()))
    assert torch.get_num_threads() == threads
