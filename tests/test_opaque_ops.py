"""piip.ops.opaque: eager kernels as opaque custom ops of compiled CPU inference graphs.

Each op is checked with ``torch.library.opcheck`` (schema, fake tensor against the real output's
shape and strides, dispatch), the graphs are captured with the cheap ``eager`` backend (which runs
the ops' bodies), and the ops appear only where they may: compiled inference on CPU, not training,
not export, not when switched off."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import piip
from piip.ops import opaque

from conftest import tiny_overrides

OPAQUE = ("bilinear", "add_pos_table", "dwconv_tokens", "upsample2x", "deform_points")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(name: str = "piip_tsb_1120_896_448", depth: int = 2) -> torch.nn.Module:
    over = tiny_overrides(name, 64)
    over["branches"] = [dict(b, depth=depth) for b in over["branches"]]
    over.pop("num_classes", None)
    return piip.create_model(name, **over).eval()


def _capture(model, x, **compile_kwargs) -> tuple[Counter, object]:
    """The piip ops (other than the linears and the fold) in the graph Dynamo hands the backend, and
    the compiled output (the 'eager' backend runs that graph as is)."""
    seen: Counter = Counter()

    def backend(gm, inputs):
        for n in gm.graph.nodes:
            name = str(n.target)
            if n.op == "call_function" and name.startswith("piip."):
                seen[name.split(".")[1]] += 1
        return gm
    out = torch.compile(model, fullgraph=True, backend=backend, **compile_kwargs)(x)
    return seen, out


def _flat(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.cat([v.flatten() for v in out.values()])


def test_ops_pass_opcheck():
    """Fake and real outputs agree in shape and strides (a channels-last map stays channels-last),
    and each op is a well-formed custom op."""
    from piip.branches.vit import _add_pos_op
    from piip.layers.mlp import _dwconv_tokens_op
    from piip.layers.pyramid import _upsample2x_op
    from piip.ops.deform_fused import _points_op
    from piip.ops.resize import _bilinear_op
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 8, 5, 7, generator=g)
    torch.library.opcheck(_bilinear_op, (m, [9, 11], None))
    torch.library.opcheck(_bilinear_op, (m.contiguous(memory_format=torch.channels_last), [3, 4], 0.5))
    pos = torch.randn(1, 1 + 16, 8, generator=g)
    torch.library.opcheck(_add_pos_op, (torch.randn(2, 6, 8, generator=g), pos, 1, [4, 4], [2, 3]))
    tokens = torch.randn(2, 5 * 7, 8, generator=g)
    torch.library.opcheck(_dwconv_tokens_op, (tokens, torch.randn(8, 1, 3, 3, generator=g),
                                              torch.randn(8, generator=g), 5, 7))
    up_w, up_b = torch.randn(8, 6, 2, 2, generator=g), torch.randn(6, generator=g)
    torch.library.opcheck(_upsample2x_op, (m, up_w, up_b))
    torch.library.opcheck(_points_op, _deform_inputs(g))


def _deform_inputs(g: torch.Generator) -> tuple:
    """value (2, 5*7 + 3*4, 4, 8) on two levels, shared reference points, offsets, weights."""
    n, lq, heads, levels, points = 2, 10, 4, 2, 4
    value = torch.randn(n, 5 * 7 + 3 * 4, heads, 8, generator=g)
    ref = torch.rand(1, lq, levels, 2, generator=g)
    off = torch.randn(n, lq, heads, levels, points, 2, generator=g) * 2
    attn = torch.softmax(torch.randn(n, lq, heads, levels * points, generator=g), -1)
    return value, [5, 7, 3, 4], [0, 35], ref, off, attn.view(n, lq, heads, levels, points)


def test_ops_equal_the_stock_modules():
    """Each op's body against the module code it stands for (stock PyTorch layers)."""
    from piip.branches.vit import _add_pos_op, resize_pos_embed
    from piip.layers.mlp import _dwconv_tokens_op
    from piip.layers.pyramid import _upsample2x_op
    from piip.ops import ms_deform_attn_points
    from piip.ops.deform_fused import _points_op
    from piip.ops.resize import _bilinear_op
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 8, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.interpolate(m, size=(9, 11), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_bilinear_op(m, [9, 11], None), want)
    pos, x = torch.randn(1, 1 + 16, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    torch.testing.assert_close(_add_pos_op(x, pos, 1, [4, 4], [2, 3]), x + resize_pos_embed(pos[:, 1:], (4, 4), (2, 3)))
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    tokens = torch.randn(2, 5 * 7, 8, generator=g)
    with torch.no_grad():
        want = conv(tokens.transpose(1, 2).reshape(2, 8, 5, 7)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(_dwconv_tokens_op(tokens, conv.weight, conv.bias, 5, 7), want, rtol=1e-5, atol=1e-6)
        up = torch.nn.ConvTranspose2d(8, 6, 2, stride=2)
        torch.testing.assert_close(_upsample2x_op(m, up.weight, up.bias), up(m), rtol=1e-5, atol=1e-6)
    value, shapes, starts, ref, off, attn = _deform_inputs(g)
    want = ms_deform_attn_points(value, [(5, 7), (3, 4)], starts, ref, off, attn, impl="reference")
    torch.testing.assert_close(_points_op(value, shapes, starts, ref, off, attn), want, rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_compiled_inference_takes_the_ops_and_matches_eager():
    model, x = _tiny(), torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        seen, out = _capture(model, x)
    assert {k for k in seen if k in OPAQUE} == set(OPAQUE), seen
    assert seen["add_pos_table"] == 3 and seen["bilinear"] == 2 + 2     # three branches; 2 views + 2 merge resizes
    assert seen["deform_points"] == seen["dwconv_tokens"]               # one sampling and one ConvFFN an edge
    torch.testing.assert_close(_flat(out), _flat(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_ops_take_symbolic_sizes():
    """A dynamic graph (sizes as SymInts) passes the sizes to the ops and serves a second size."""
    model = _tiny()
    fn = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for size in ((64, 96), (96, 64)):
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(_flat(fn(x)), _flat(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_no_ops_in_training_export_or_when_switched_off():
    model, x = _tiny(), torch.randn(1, 3, 64, 64)
    seen, _ = _capture(model.train(), x)         # gradients wanted: only the input views (no gradient)
    assert {k: n for k, n in seen.items() if k in OPAQUE} == {"bilinear": 2}, seen
    model.eval()
    previous = opaque.set_enabled(False)
    try:
        with torch.no_grad():
            seen, _ = _capture(model, x)
    finally:
        opaque.set_enabled(previous)
    assert not any(k in OPAQUE for k in seen), seen
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("piip.") for t in targets), sorted(t for t in targets if "piip" in t)
