"""piip.ops.linear: oneDNN linears with fused GELU / residual add on the eager CPU inference path.

They must equal the stock expression, run only where nothing can tell them apart (no gradient, no
autocast, no dispatch mode, no hook, no wrapped layer), and leave every other path untouched."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import piip
from piip.layers.attention import Attention
from piip.layers.linear import apply_linear
from piip.layers.mlp import Mlp
from piip.ops import linear as onednn

needs_op = pytest.mark.skipif(not onednn.enabled(), reason="this torch build has no mkldnn::_linear_pointwise "
                              "(or PIIP_ONEDNN_LINEAR=0): the stock path is the only one")
OP = "mkldnn::_linear_pointwise"


@pytest.fixture(autouse=True)
def _restore_switch():
    previous = onednn.set_enabled(True)
    yield
    onednn.set_enabled(previous)


def ran_onednn(fn) -> tuple[object, bool]:
    """``fn()``'s result and whether it called the oneDNN op (the profiler, unlike a dispatch mode,
    does not switch the path off)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name.startswith(OP) for e in prof.events())


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_epilogues_equal_the_stock_expression(dtype):
    if dtype not in onednn._DTYPES:
        pytest.skip("this CPU has no oneDNN bfloat16 inner product: bf16 keeps F.linear")
    x = torch.randn(2, 37, 24).to(dtype)
    w, b = (torch.randn(40, 24) * 0.2).to(dtype), torch.randn(40).to(dtype)
    res = torch.randn(2, 37, 40).to(dtype)
    gate = torch.randn(40).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    cases = {
        None: (dict(), F.linear(x, w, b)),
        "gelu": (dict(act="gelu"), F.gelu(F.linear(x, w, b))),
        "gelu_tanh": (dict(act="gelu_tanh"), F.gelu(F.linear(x, w, b), approximate="tanh")),
        "residual": (dict(residual=res), res + F.linear(x, w, b)),
        "gated residual": (dict(residual=res, scale=gate), res + gate * F.linear(x, w, b)),
        "no bias": (dict(), F.linear(x, w)),
    }
    for name, (kw, want) in cases.items():
        with torch.inference_mode():
            got, used = ran_onednn(lambda: onednn.linear(x, w, None if name == "no bias" else b, **kw))
        assert used, name
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol, msg=name)
    assert torch.equal(res, res.clone())   # the residual is read, never written


def _weight_products(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    return out, len([e for e in prof.events() if e.name == "aten::mul" and list(e.input_shapes[0]) == [40, 24]])


@needs_op
@pytest.mark.parametrize("rows", [5, 60])
def test_gate_folded_into_the_weight_only_where_that_is_less_work(rows):
    """Weights whose changes cannot be tracked (made under inference_mode): a gated residual scales
    the weight (out x in multiplies) when there are at least as many rows as input features, and
    gates the GEMM's output (rows x out) otherwise. Trackable weights: the gated weight is computed
    on the first call only, at any row count, and again after a weight changes in place. All equal
    the stock expression, with and without a residual."""
    with torch.inference_mode():
        x, w, b = torch.randn(1, rows, 24), torch.randn(40, 24) * 0.2, torch.randn(40)
        res, gate = torch.randn(1, rows, 40), torch.randn(40)
    assert onednn._scale_weight(x) == (rows >= 24)
    with torch.inference_mode():
        (gated, scaled), products = _weight_products(
            lambda: (onednn.linear(x, w, b, residual=res, scale=gate), onednn.linear(x, w, b, scale=gate)))
    assert products == (2 if rows >= 24 else 0)
    torch.testing.assert_close(gated, res + gate * F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled, gate * F.linear(x, w, b), atol=1e-5, rtol=1e-5)

    w, b, gate = w.clone(), b.clone(), gate.clone()            # ordinary tensors: tracked
    with torch.no_grad():
        (gated, scaled), products = _weight_products(
            lambda: (onednn.linear(x, w, b, residual=res, scale=gate), onednn.linear(x, w, b, scale=gate)))
        assert products == 1
        torch.testing.assert_close(gated, res + gate * F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scaled, gate * F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        gate.mul_(-2)                                            # an in-place change: computed again
        again, products = _weight_products(lambda: onednn.linear(x, w, b, residual=res, scale=gate))
        assert products == 1
        torch.testing.assert_close(again, res + gate * F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_op
@pytest.mark.parametrize("onednn_faster", [True, False])
def test_tuning_times_both_engines_once_per_shape_bucket(monkeypatch, onednn_faster):
    """``set_tuning(True)``: the first call of a shape runs oneDNN and the stock expression (one
    warm-up and two timed runs each) and every later call of that shape bucket (rows rounded up to
    a power of two) runs only the faster one; both give the stock result. Off by default."""
    previous = onednn.set_tuning(True)
    assert previous is (os.environ.get("PIIP_LINEAR_TUNE") == "1")      # off unless asked for
    assert onednn.tuning()
    monkeypatch.setattr(onednn, "_CHOICES", {})
    clock, calls = [0.0], {"onednn": 0, "stock": 0}
    real_onednn, real_linear = onednn._onednn, F.linear

    def fake_onednn(*a):
        calls["onednn"] += 1
        clock[0] += 1.0 if onednn_faster else 10.0
        return real_onednn(*a)

    def fake_linear(*a):
        calls["stock"] += 1
        clock[0] += 10.0 if onednn_faster else 1.0
        return real_linear(*a)
    monkeypatch.setattr(onednn, "_onednn", fake_onednn)
    monkeypatch.setattr(onednn.F, "linear", fake_linear)
    monkeypatch.setattr(onednn, "_clock", lambda: clock[0])
    w, b = torch.randn(40, 24) * 0.2, torch.randn(40)
    try:
        with torch.inference_mode():
            for rows, tuned in [(37, True), (50, False), (64, False), (65, True)]:
                x, res = torch.randn(rows, 24), torch.randn(rows, 40)
                before = dict(calls)
                got = onednn.linear(x, w, b, residual=res)
                torch.testing.assert_close(got, res + real_linear(x, w, b), atol=1e-5, rtol=1e-5)
                ran = {k: calls[k] - before[k] for k in calls}
                if tuned:
                    assert ran == {"onednn": 3, "stock": 3}, rows
                else:
                    assert ran == ({"onednn": 1, "stock": 0} if onednn_faster else {"onednn": 0, "stock": 1}), rows
        assert set(onednn._CHOICES.values()) == {onednn_faster} and len(onednn._CHOICES) == 2
    finally:
        onednn.set_tuning(previous)


@needs_op
def test_paths_that_must_stay_stock():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    # a gradient is wanted: autograd must see F.linear (the oneDNN op has no backward)
    wg = w.clone().requires_grad_()
    y, used = ran_onednn(lambda: onednn.linear(x, wg, b, act="gelu"))
    assert not used and y.grad_fn is not None
    y.sum().backward()
    wr = w.clone().requires_grad_()
    F.gelu(F.linear(x, wr, b)).sum().backward()
    torch.testing.assert_close(wg.grad, wr.grad)
    with torch.no_grad():
        assert ran_onednn(lambda: onednn.linear(x, wg, b))[1]       # same weight, no grad mode: fast
        # autocast decides the GEMM dtype; calling the op directly would bypass it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, used = ran_onednn(lambda: onednn.linear(x, w, b))
        assert not used and y.dtype == torch.bfloat16
        # a dispatch mode (here the FLOP counter) must see an aten GEMM
        with FlopCounterMode(display=False) as fc:
            onednn.linear(x, w, b)
        assert fc.get_total_flops() == 2 * 5 * 8 * 6
        assert not ran_onednn(lambda: onednn.linear(x.double(), w.double(), b.double()))[1]
        onednn.set_enabled(False)
        assert not ran_onednn(lambda: onednn.linear(x, w, b))[1]


def test_bad_arguments_are_refused():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        onednn.linear(x, w, act="relu")
    with pytest.raises(ValueError, match="cannot be fused together"):
        onednn.linear(x, w, act="gelu", residual=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cannot be fused together"):
        onednn.linear(x, w, act="gelu", scale=torch.ones(3))


@needs_op
def test_hooks_and_wrapped_layers_see_the_stock_values():
    """A forward hook on fc1 (activation capture) must get fc1's own output, not the GELU'd one, and a
    hook on the attention must not see the block's residual folded in."""
    torch.manual_seed(0)
    mlp = Mlp(16, 32).eval()
    x = torch.randn(1, 9, 16)
    seen = {}
    mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o))
    with torch.inference_mode():
        out, used = ran_onednn(lambda: mlp(x, residual=x))
    torch.testing.assert_close(seen["fc1"], F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
    with torch.no_grad():
        want = x + mlp.fc2(F.gelu(mlp.fc1(x)))
    torch.testing.assert_close(out, want)
    assert used            # fc2 (unhooked) still took the fused residual add

    class Wrapped(nn.Module):                       # what LoRA-style wrappers look like
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base, self.delta = base, nn.Linear(base.in_features, base.out_features, bias=False)

        def forward(self, x):
            return self.base(x) + self.delta(x)
    # a per-instance forward (how accelerate attaches its hooks) is respected too
    patched = nn.Linear(16, 32)
    plain_forward = patched.forward
    patched.forward = lambda t: plain_forward(t) * 2.0
    with torch.inference_mode():
        res = torch.randn(1, 9, 32)
        torch.testing.assert_close(apply_linear(patched, x, residual=res),
                                   res + 2.0 * F.linear(x, patched.weight, patched.bias))

    wrapped = Wrapped(nn.Linear(16, 32))
    with torch.inference_mode():
        got = apply_linear(wrapped, x, act="gelu")
        torch.testing.assert_close(got, F.gelu(wrapped(x)))

    model = piip.create_model("piip_tsb_368_192_128_cls", img_size=64, num_classes=5,
                              branches={"embed_dim": 32, "num_heads": 2}, deform_num_heads=2).eval()
    block = model.backbone.branches[0].blocks[0]
    assert isinstance(block.attn, Attention)
    captured = {}
    handle = block.attn.register_forward_hook(lambda m, i, o: captured.update(args=i, out=o))
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
        handle.remove()
        onednn.set_enabled(False)
        alone = block.attn(*captured["args"])     # the attention's own output, stock path
    torch.testing.assert_close(captured["out"], alone)


def tiny_gated(name: str) -> nn.Module:
    """A tiny eval model of ``name`` whose gates and layer scales are drawn in [0.5, 1.5] (instead of
    their 0 / 1e-5 inits), so that folding them into the projections shows in the outputs."""
    torch.manual_seed(0)
    extra = {"num_classes": 5} if name.endswith("cls") else {}
    model = piip.create_model(name, img_size=64, branches={"embed_dim": 32, "num_heads": 2},
                              deform_num_heads=2, **extra).eval()
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return model


@needs_op
def test_hooked_deformable_attention_sees_its_own_output():
    """The interaction units' gated residuals (``query + gamma * attn``) fuse into the output
    projections, unless a hook watches the attention: then it gets its own output."""
    from piip.layers.deform_attn import MSDeformAttn
    model, x = tiny_gated("piip_tsb_1120_896_448"), torch.randn(2, 3, 64, 64)
    attn = next(m for m in model.modules() if isinstance(m, MSDeformAttn))
    captured = {}
    attn.register_forward_hook(lambda m, i, o: captured.update(args=i, out=o))
    with torch.inference_mode():
        _, used = ran_onednn(lambda: model(x))
        onednn.set_enabled(False)
        alone = attn(*captured["args"])
    assert used
    torch.testing.assert_close(captured["out"], alone)


@needs_op
@pytest.mark.parametrize("name", ["piip_tsb_1120_896_448", "piip_tsb_368_192_128_cls",
                                  "piip_sbl_1568_1120_672_dinov2"])   # the last: layer scale
def test_models_equal_with_and_without_the_onednn_path(name):
    model, x = tiny_gated(name), torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fast, used = ran_onednn(lambda: model(x))
        onednn.set_enabled(False)
        stock, used_off = ran_onednn(lambda: model(x))
    assert used and not used_off
    fast, stock = (fast, stock) if isinstance(fast, dict) else ({"logits": fast}, {"logits": stock})
    for k in stock:
        # relative to the map's scale (random gates of 0.5-1.5 grow the activations)
        torch.testing.assert_close(fast[k], stock[k], atol=1e-5 * float(stock[k].abs().max()), rtol=1e-5)
    # training keeps the stock path and its gradients
    model.train()
    _, used_train = ran_onednn(lambda: model(x))
    assert not used_train


def _custom_op_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "onednn_linear" in str(n.target))


@needs_op
def test_compiled_inference_calls_the_custom_op_and_export_never_does():
    """Under torch.compile without gradients the linears go through ``piip::onednn_linear`` (one
    graph, same outputs); with gradients, and in an exported program, they stay aten linears.
    One layer-scaled ViT block (GELU, residual and gated-residual fusions), to keep the compile short."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from piip.branches.vit import Block

    class OneBlock(nn.Module):               # the block takes its grid as a Python tuple
        def __init__(self) -> None:
            super().__init__()
            self.block = Block(32, 2, layer_scale=0.7, window_size=4)

        def forward(self, x):
            return self.block(x, (8, 8))
    torch.manual_seed(0)
    model, x = OneBlock().eval(), torch.randn(2, 64, 32)

    def compiled_graph(grad: bool):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        with torch.set_grad_enabled(grad):
            out, reads = _packed_reads(lambda: torch.compile(model, backend=counter, fullgraph=True)(x))
        assert counter.frame_count == 1
        assert reads == (0 if grad else 4)   # run time reads the kept oneDNN layouts, gated ones too
        return out, counter.graphs[0]
    with torch.no_grad():
        eager = model(x)
    got, graph = compiled_graph(grad=False)
    assert _custom_op_calls(graph) == 4      # qkv, proj + residual, fc1 + GELU, fc2 + residual
    assert torch.equal(got, eager)
    onednn.set_enabled(False)
    with torch.no_grad():
        want = model(x)
    onednn.set_enabled(True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    out, graph = compiled_graph(grad=True)
    assert _custom_op_calls(graph) == 0
    out.sum().backward()
    assert model.block.mlp.fc1.weight.grad is not None
    torch._dynamo.reset()
    with torch.no_grad():
        exported = torch.export.export(model, (x,), strict=False)
    assert _custom_op_calls(exported.graph_module) == 0


def test_an_unknown_dropout_module_is_called_not_skipped():
    """Only an identity, an inactive ``nn.Dropout`` or ``DropPath`` may be skipped when the residual
    is fused; a dropout replaced by any other module runs, and the residual is added after it."""
    from piip.layers.linear import apply_output_linear

    class Halve(nn.Module):
        def forward(self, t):
            return t * 0.5
    torch.manual_seed(0)
    proj, x, res = nn.Linear(8, 4).eval(), torch.randn(3, 8), torch.randn(3, 4)
    gate = torch.rand(4)
    with torch.inference_mode():
        torch.testing.assert_close(apply_output_linear(proj, x, Halve(), res, gate),
                                   res + gate * (0.5 * F.linear(x, proj.weight, proj.bias)))
        torch.testing.assert_close(apply_output_linear(proj, x, nn.Dropout(0.3).eval(), res, gate),
                                   res + gate * F.linear(x, proj.weight, proj.bias), atol=1e-6, rtol=1e-6)


def _packed_reads(fn) -> tuple[object, int]:
    """``fn()``'s result and how many linear calls read a prepacked (opaque oneDNN) weight."""
    reads = []
    real = onednn._onednn

    def spy(x, weight, bias, act, residual):
        reads.append(weight.is_mkldnn)
        return real(x, weight, bias, act, residual)
    onednn._onednn = spy
    try:
        return fn(), sum(reads)
    finally:
        onednn._onednn = real


@needs_op
@pytest.mark.parametrize("name", ["piip_tsb_1120_896_448", "piip_tsb_368_192_128_cls",
                                  "piip_sbl_1568_1120_672_dinov2"])
def test_prepacked_weights_change_no_output_bit(name):
    """Kept oneDNN-layout weights (plain and gated) give exactly the outputs of the per-call layout."""
    model, x = tiny_gated(name), torch.randn(2, 3, 64, 64)
    previous = onednn.set_prepack(True)
    try:
        with torch.inference_mode():
            packed, reads = _packed_reads(lambda: model(x))
            onednn.set_prepack(False)
            plain, reads_off = _packed_reads(lambda: model(x))
    finally:
        onednn.set_prepack(previous)
    assert reads > 0 and reads_off == 0
    packed, plain = (packed, plain) if isinstance(packed, dict) else ({"y": packed}, {"y": plain})
    for k in plain:
        assert torch.equal(packed[k], plain[k]), k


@needs_op
def test_prepacked_weight_follows_the_weights_and_dies_with_them():
    """The kept layout is redone after an in-place change (load_state_dict), is not used for one
    row or when the weight is too large, and is freed with its layer."""
    import gc
    from piip.ops import derived
    previous = onednn.set_prepack(True)
    try:
        lin, gate = nn.Linear(24, 40), nn.Parameter(torch.rand(40) + 0.5)
        x, res = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
        with torch.inference_mode():
            for kw in (dict(), dict(residual=res, scale=gate)):
                got, reads = _packed_reads(lambda: onednn.linear(x, lin.weight, lin.bias, **kw))
                assert reads == 1
                want = res + gate * F.linear(x, lin.weight, lin.bias) if kw else F.linear(x, lin.weight, lin.bias)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            lin.load_state_dict({"weight": torch.randn(40, 24), "bias": torch.randn(40)})
            got, reads = _packed_reads(lambda: onednn.linear(x, lin.weight, lin.bias))
            assert reads == 1
            torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
            _, reads = _packed_reads(lambda: onednn.linear(x[:1, :1], lin.weight, lin.bias))
            assert reads == 0                          # one row: another kernel, never packed
            big = nn.Linear(1 << 10, (1 << 10) + 1)    # just over the kept size
            _, reads = _packed_reads(lambda: onednn.linear(torch.randn(4, 1 << 10), big.weight, big.bias))
            assert reads == 0
        n = len(derived._CACHE)
        lin = gate = kw = None                          # (the closures above read these names)
        gc.collect()
        assert len(derived._CACHE) <= n - 2           # the packed and the gated entries went with the layer
    finally:
        onednn.set_prepack(previous)


def test_a_weight_freed_after_the_cache_module_is_torn_down_raises_nothing(monkeypatch):
    """At interpreter exit a module's globals are cleared (set to None) while weights can still be
    alive; freeing one later runs its entry's weak-reference callback, which must not look the cache
    up as a global (that printed "Exception ignored ... 'NoneType' object has no attribute 'get'")."""
    import functools
    import gc
    import sys

    from piip.ops import derived
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    weight = nn.Parameter(torch.randn(8, 4))
    derived.cached("test-shutdown", (weight,), functools.partial(torch.mul, weight.detach(), 2))
    cache = derived._CACHE
    monkeypatch.setattr(derived, "_CACHE", None)      # what shutdown does to the module's globals
    del weight
    gc.collect()
    monkeypatch.undo()
    assert not raised, [str(r.exc_value) for r in raised]
    assert not any(k[0] == "test-shutdown" for k in cache)   # the entry still went with its weight


def test_switches_read_their_environment_and_each_pair_sets_and_reads(monkeypatch):
    """The ``Switch`` behind every fast path's ``set_enabled`` / ``enabled``: a default-on path is
    off only with ``env=0``, a default-off one (engine tuning) on only with ``env=1``."""
    from piip.layers import fold
    from piip.ops import opaque, winograd
    from piip.ops.switch import Switch
    for value, on, off in [(None, True, False), ("0", False, False), ("1", True, True), ("yes", True, False)]:
        if value is None:
            monkeypatch.delenv("PIIP_TEST_SWITCH", raising=False)
        else:
            monkeypatch.setenv("PIIP_TEST_SWITCH", value)
        assert Switch("PIIP_TEST_SWITCH").on is on
        assert Switch("PIIP_TEST_SWITCH", default=False).on is off
    for set_, get in [(fold.set_enabled, fold.enabled), (opaque.set_enabled, opaque.enabled),
                      (winograd.set_enabled, winograd.enabled), (onednn.set_prepack, onednn.prepacking),
                      (onednn.set_tuning, onednn.tuning)]:
        before = get()
        assert set_(not before) is before and get() is (not before)
        assert set_(before) is (not before) and get() is before
