"""piip.layers.fold: the interaction edges' proj -> feat_norm -> value_proj in fewer multiply-adds.

The fold must equal the stock modules, run only where nobody can tell (inference, no hook, no
tracer or dispatch mode), follow every change of the weights, and stay off where it does not pay."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import piip
from piip.layers import fold
from piip.ops import derived
from piip.layers.interaction import InteractionEdge


@pytest.fixture(autouse=True)
def _restore_switch():
    previous = fold.set_enabled(True)
    yield
    fold.set_enabled(previous)


def stock(proj, norm, out, x):
    return out(norm(proj(x)))


def counted(monkeypatch) -> list[int]:
    """Counts the folds computed (cache misses)."""
    calls = [0]
    real = fold.fold

    def counting(*args):
        calls[0] += 1
        return real(*args)
    monkeypatch.setattr(fold, "fold", counting)
    return calls


def randomised(*mods: nn.Module) -> None:
    with torch.no_grad():
        for m in mods:
            for p in m.parameters():
                p.normal_(0.3 if p.dim() == 1 else 0.0, 0.2)


@pytest.mark.parametrize("norm_kind", ["layernorm", "no affine", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_equals_the_stock_path(norm_kind, bias):
    d_in, d_out, v = 12, 24, 16
    proj, out = nn.Linear(d_in, d_out, bias=bias), nn.Linear(d_out, v, bias=bias)
    norm = {"layernorm": nn.LayerNorm(d_out, eps=1e-6), "no affine": nn.LayerNorm(d_out, elementwise_affine=False),
            "identity": nn.Identity()}[norm_kind]
    randomised(proj, norm, out)
    x = torch.randn(2, 30, d_in) * 3 + 1
    with torch.inference_mode():
        got = fold.folded_path(proj, norm, out, x)
        want = stock(proj, norm, out, x)
    assert got is not None
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_fold_is_skipped_where_it_does_not_pay_or_can_be_seen(monkeypatch):
    proj, norm, out = nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 8)   # coarse -> fine: no saving
    x = torch.randn(1, 5, 16)
    with torch.inference_mode():
        assert fold.folded_path(proj, norm, out, x) is None
    proj, norm, out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)
    x = torch.randn(1, 5, 8)
    assert fold.folded_path(proj, norm, out, x) is None                     # gradient wanted
    with torch.no_grad():
        assert fold.folded_path(proj, norm, out, x) is not None
        with FlopCounterMode(display=False):                                 # counted: stock ops
            assert fold.folded_path(proj, norm, out, x) is None
        assert fold.folded_path(proj, norm, out, x.double()) is None         # weights float32
        h = norm.register_forward_hook(lambda *a: None)
        assert fold.folded_path(proj, norm, out, x) is None                  # a hook sees norm's output
        h.remove()
        fold.set_enabled(False)
        assert fold.folded_path(proj, norm, out, x) is None


def test_fold_follows_weight_changes(monkeypatch):
    calls = counted(monkeypatch)
    proj, norm, out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)
    randomised(proj, norm, out)
    x = torch.randn(1, 9, 8)

    def check():
        with torch.inference_mode():
            torch.testing.assert_close(fold.folded_path(proj, norm, out, x), stock(proj, norm, out, x),
                                       atol=2e-5, rtol=1e-5)
    check()
    check()
    assert calls[0] == 1                                                   # cached
    with torch.no_grad():
        norm.weight.mul_(1.5)                                              # in place (an optimizer step)
    check()
    assert calls[0] == 2
    out.load_state_dict({k: t * 2 for k, t in out.state_dict().items()})  # copied in
    check()
    assert calls[0] == 3
    proj.weight = nn.Parameter(torch.randn(16, 8))                         # replaced
    check()
    assert calls[0] == 4


def _tiny_tsb(**kw) -> nn.Module:
    torch.manual_seed(0)
    m = piip.create_model("piip_tsb_1120_896_448", img_size=64, merge="linear", **kw).eval()
    with torch.no_grad():                    # open the zero-initialised gates so the edges matter
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return m


def test_tiny_model_takes_the_fold_on_fine_to_coarse_edges_only(monkeypatch):
    m = _tiny_tsb()
    x = torch.randn(1, 3, 64, 64)
    calls = counted(monkeypatch)
    with torch.inference_mode():
        fold.set_enabled(False)
        want = m.forward_features(x)
        fold.set_enabled(True)
        got = m.forward_features(x)
    # 0to1 and 1to2 of every group (the narrower, finer branch read by the wider one)
    assert calls[0] == 2 * len(m.interactions)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert not torch.equal(got, want)                                      # a different computation
    m.train()
    calls[0] = 0
    m.forward_features(x).sum().backward()                    # training: stock path
    assert calls[0] == 0


def test_compiled_edge_runs_the_fold_as_one_op():
    torch.manual_seed(0)
    edge = InteractionEdge(8, 16, num_heads=2, num_points=2, deform_ratio=0.5).eval()
    randomised(edge)
    q, f = torch.randn(1, 16, 16), torch.randn(1, 64, 8)
    with torch.inference_mode():
        fold.set_enabled(False)
        want = edge(q, (4, 4), f, (8, 8))
        fold.set_enabled(True)
        gm = []

        def backend(g, inputs):
            gm.append(g)
            return g.forward
        got = torch.compile(edge, backend=backend, fullgraph=True)(q, (4, 4), f, (8, 8))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ops = [n.target for g in gm for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.piip.folded_feat.default in ops or torch.ops.piip.folded_feat in ops


def test_cache_is_bounded_and_drops_dead_weights(monkeypatch):
    monkeypatch.setattr(derived, "_CACHE", {})
    monkeypatch.setattr(derived, "_MAX_ENTRIES", 2)
    x = torch.randn(1, 4, 8)
    paths = [(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)) for _ in range(3)]
    with torch.inference_mode():
        for p in paths[:2]:
            fold.folded_path(*p, x)
        assert len(derived._CACHE) == 2
        del paths[0]                                   # its weights die: its entry goes first
        gc.collect()
        got = fold.folded_path(*paths[-1], x)
        torch.testing.assert_close(got, stock(*paths[-1], x), atol=2e-5, rtol=1e-5)
    assert len(derived._CACHE) == 2
    assert not any(w is not None and w.expired() for e in derived._CACHE.values() for w in e.alive)
