"""benchmarks/latency.py runs its cases end to end (tiny widths, eager and a cheap compile backend),
reports the ratios it promises and regenerates its docs block. No timing is asserted."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
latency = pytest.importorskip("latency")

TINY_VIT = {"embed_dim": 32, "num_heads": 2, "depth": 2}


def _tiny(n_branches: int) -> dict:
    return {"branches": [{"embed_dim": 32 * (i + 1), "num_heads": 2, "depth": 2} for i in range(n_branches)],
            "deform_num_heads": 2}


def _case(key: str, scale: float) -> "latency.Case":
    return dataclasses.replace(latency.CASES[key], quick_scale=scale)


def _check_row(row: dict) -> None:
    for k in ("piip_eager_s", "base_eager_s", "eager_ratio", "flops_ratio", "counted_ratio"):
        assert row[k] > 0, k
    assert row["eager_ratio"] == pytest.approx(row["piip_eager_s"] / row["base_eager_s"])


@pytest.mark.heavy
def test_trunk_case_eager_and_compiled(tmp_path):
    row = latency.measure_case(_case("tsb-1120", 1 / 16), True, 1, torch.device("cpu"), {"backend": "aot_eager"},
                               overrides={"piip": _tiny(3), "base": {"branches": [TINY_VIT]}})
    _check_row(row)
    assert (row["piip_side"], row["base_side"]) == (64, 64)
    assert not row["compile_errors"], row["compile_errors"]
    assert row["compiled_ratio"] == pytest.approx(row["piip_compiled_s"] / row["base_compiled_s"])
    # the FLOPs ratio is piip.complexity's (papers' convention) at the sizes that ran
    from piip.complexity import count
    expect = (count("piip_tsb_1120_896_448", img_size=[64], merge="linear", **_tiny(3)).flops
              / count("vitdet_b_1024", img_size=[64], branches=[TINY_VIT]).flops)
    assert row["flops_ratio"] == pytest.approx(expect)
    doc = tmp_path / "perf.md"
    doc.write_text(f"intro\n{latency.BEGIN}\nold\n{latency.END}\ntail\n")
    latency.update_docs(latency.markdown([row], "header"), doc)
    text = doc.read_text()
    assert "old" not in text and "| tsb-1120 |" in text and text.startswith("intro") and text.endswith("tail\n")


@pytest.mark.heavy
def test_each_compiled_model_gets_its_own_static_graph():
    """PIIP and its baseline are often one class (DeiT-B is a one-branch PIIP classifier); compiled
    one after the other at different sizes, Dynamo's automatic dynamic shapes traced the second one
    with symbolic sizes, and a case after another reused or re-specialised the earlier graphs."""
    symbolic: list[bool] = []

    def record(gm, example_inputs):
        symbolic.append(any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in x.shape)) for x in example_inputs))
        return gm.forward

    over = {"piip": _tiny(3), "base": {"branches": [TINY_VIT]}}
    for key, scale in (("cls-eval", 1 / 4), ("tsb-1568-896", 1 / 16)):
        start = len(symbolic)
        row = latency.measure_case(_case(key, scale), True, 1, torch.device("cpu"), {"backend": record}, overrides=over)
        assert row["piip_side"] != row["base_side"] and not row["compile_errors"]
        assert symbolic[start:] == [False, False], (key, symbolic[start:])   # one static graph a model


def test_dino_training_case_eager():
    """The DINO step (training, the backbone swapped in for the compiled variant); the classifier's
    train step is the same pattern on a plain model."""
    head = {"det": dict(num_queries=10, transformer_dim=32, transformer_heads=2, transformer_ffn=64,
                        enc_layers=1, dec_layers=1, dn_queries=4)}
    over = {"piip": {**_tiny(3), **head}, "base": {"branches": [TINY_VIT], **head}}
    row = latency.measure_case(_case("dino", 1 / 8), True, 1, torch.device("cpu"), None, overrides=over)
    _check_row(row)
    assert "compiled_ratio" not in row


def test_every_table1_pair_is_a_trunk_and_an_as_built_case():
    """The papers' Table I: nine PIIP configurations, each against its ViTDet; two share the side
    1568 (TSB 1568/896/448 and 1568/1120/672), which once shared a key, so one of them was dropped."""
    table1 = {"piip_tsb_1120_896_448", "piip_tsb_1568_896_448", "piip_tsb_1568_1120_672", "piip_sbl_1120_672_448",
              "piip_sbl_1344_896_448", "piip_sbl_1568_896_672", "piip_tsbl_1344_896_672_448",
              "piip_tsbl_1568_1120_672_448", "piip_tsbl_1792_1568_1120_448"}
    for kind in ("trunk", "as-built"):
        cases = [c for c in latency.CASES.values() if c.kind == kind]
        assert {c.piip for c in cases} == table1 and len(cases) == len(table1)
        assert all(c.base == ("vitdet_b_1024" if "_tsb_" in c.piip else "vitdet_l_1024") for c in cases)
    assert latency.CASES["tsb-1568-896"].piip == "piip_tsb_1568_896_448"
    assert latency.CASES["tsb-1568"].piip == "piip_tsb_1568_1120_672"


def test_cli_list_and_bad_case(capsys):
    assert latency.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("tsb-1120", "sbl-1344", "tsbl-1792-built", "cls", "seg", "dino"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        latency.main(["--cases", "tsb-1120", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown case 'nope'" in err[-1] and "cls-eval" in err[-1] and "Traceback" not in "".join(err)


def test_ab_revisions_compares_against_a_git_revision(tmp_path):
    """benchmarks/ab_revisions.py imports src/piip at a revision as ``piip_base`` next to the working
    tree's piip, gives both the same weights and times them interleaved; at HEAD the tiny models
    agree (the working tree's changes, if any, are float-rounding equal on this case's path)."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode:
        pytest.skip("not a git checkout: ab_revisions.py reads revisions with git archive")
    ab = pytest.importorskip("ab_revisions")
    base = ab.import_revision("HEAD", tmp_path)
    assert base.__name__ == "piip_base" and base is not sys.modules["piip"]
    timm = pytest.importorskip("timm")   # the base copy's own timm registration does not stay
    assert timm.models.model_entrypoint("piip_tsb_1120_896_448").__module__ == "piip.integrations.timm"
    row = ab.compare(base, "tsb-1120", 1, gates=True, quick=True, overrides=_tiny(3))
    assert row["base_s"] > 0 and row["current_s"] > 0
    assert row["speedup"] == pytest.approx(row["base_s"] / row["current_s"])
    assert row["max_rel_diff"] < 1e-4
    with pytest.raises(SystemExit, match="--base 'no-such-rev'"):
        ab.import_revision("no-such-rev", tmp_path / "x")


def test_micro_ops_rewrites_agree_with_the_plain_ops():
    """benchmarks/micro_ops.py: each rewrite it times computes what the plain op does (timing not asserted)."""
    micro_ops = pytest.importorskip("micro_ops")
    # pixel coordinates up to ~70: two float32 ulps apart at most
    tol = {"locations": 2e-5, "dwconv": 1e-5, "conv3x3": 1e-4, "fused": 0.0}
    for key, atol in tol.items():
        rows = micro_ops.ROWS[key]()
        assert rows, key
        for name, plain, ours in rows:
            a, b = plain(), ours()
            for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                assert x.shape == y.shape, name
                torch.testing.assert_close(y, x, atol=atol, rtol=0 if key == "locations" else atol, msg=name)


def test_counted_flops_include_cpu_attention():
    """torch's counter has no formula for CPU attention; the benchmarks' counts register one, so
    the counted ratios include every model's attention (2 products of b*h*Sq*Sk*d multiply-adds)."""
    torch_count = pytest.importorskip("torch_count")
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8)
    assert torch_count.counted_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k)) \
        == 2 * 2 * 3 * 10 * 7 * 8
    qg = q.clone().requires_grad_()
    both = torch_count.counted_macs(lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, k).sum().backward())
    assert both > 2 * 2 * 3 * 10 * 7 * 8        # the backward's products are counted too


def test_breakdown_splits_both_models_without_changing_them():
    """benchmarks/breakdown.py: by-op and by-part splits of a tiny as-built pair. The parts add up to
    the step, PIIP's blocks / interactions / merge / pyramid are seen, the baseline has no
    interactions, and the timing hooks leave the model's output bit-identical (they sit on modules
    whose fused eager paths never check for hooks)."""
    breakdown = pytest.importorskip("breakdown")
    over = {"piip": _tiny(3), "base": {"branches": [TINY_VIT]}}
    case = _case("tsb-1120-built", 1 / 16)
    res = breakdown.measure(case, True, False, 2, overrides=over)
    p, b = res["piip"], res["base"]
    for r in (p, b):
        assert r["ops"]["GEMMs"] > 0 and r["macs"]["GEMMs"] > 0 and r["macs"]["attention"] > 0
        assert sum(r["parts"][k] for k in breakdown.PARTS) == pytest.approx(r["parts"]["step"])
    assert all(p["parts"][k] > 0 for k in ("blocks", "interactions", "merge", "pyramid"))
    assert b["parts"]["interactions"] == 0 and b["parts"]["blocks"] > 0
    text = breakdown.report(case, res, False)
    assert "| GEMMs |" in text and "| interactions |" in text and "**step**" in text
    # the hooks change nothing the model computes
    sides = latency.case_sides(case, True)
    model, _ = latency.build_model(case, "piip", sides["piip"], torch.device("cpu"), **over["piip"])
    latency.draw_gates(model)
    x = torch.randn(1, 3, sides["piip"], sides["piip"])
    with torch.inference_mode():
        plain = model(x)
        timer = breakdown.PartTimer()
        breakdown.watch_parts(model, timer)
        hooked = model(x)
        timer.remove()
    assert timer.acc["interactions"] > 0
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)
    assert breakdown.op_kind("aten::mm") == breakdown.op_kind("aten.addmm.default") == "GEMMs"
    assert breakdown.op_kind("aten::_embedding_bag_forward_only") == "sampling gathers"
    assert breakdown.op_kind("graph_0_cpp_fused_native_layer_norm_onednn_linear_9") == "compiled kernels"
    with pytest.raises(SystemExit):
        breakdown.main(["--cases", "nope"])
