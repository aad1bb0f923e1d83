"""Export a PIIP model to a torch.export program (``.pt2``) or ONNX with dynamic batch, height
and width, and check the written file against eager PyTorch at other sizes before keeping it.

Sizes are multiples of the model's input stride (the finest branch's patch size, or 32 for a
ConvNeXt one); the coarser branches' sizes follow symbolically from the registered resolution
ratios. Nothing is left at ``out`` unless the check passed (the file is written next to it
under a temporary name and moved into place).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import MissingDependency, check_output_file
from ..ops.ms_deform_attn import use_impl
from ..ops.symbolic import pair
from .tasks import ExportTask, find_task

__all__ = ["export_model", "ExportResult", "ExportCheckError", "check_out_path", "require_export_deps"]

FORMATS = ("onnx", "pt2")
EXTRA = "pip install 'piip[export]'"
# the deformable op as each format represents it: ONNX's GridSample (grid_sample, opset >= 16)
# is one standard node; `fused` exports too but as a Loop over embedding bags, ~100x slower in
# onnxruntime. A .pt2 program runs in PyTorch, where the eager default (fused on CPU) is fastest.
DEFAULT_IMPL = {"onnx": "reference", "pt2": None}
MAX_SIDE = 8192


class ExportCheckError(ValueError):
    """The written model disagrees with eager PyTorch (nothing was kept)."""


@dataclasses.dataclass
class ExportResult:
    path: str
    format: str
    task: str
    dynamic: bool
    inputs: list[tuple[str, str]]         # (name, shape with symbolic dims, e.g. 'batch x 3 x H x W')
    outputs: list[tuple[str, str]]
    checks: list[tuple[tuple[int, int, int], float]]   # ((batch, H, W), worst relative error)
    size_multiple: int
    min_size: int

    def summary(self) -> str:
        def fmt(items: list[tuple[str, str]]) -> str:
            return ", ".join(f"{n} ({s})" for n, s in items)
        checked = "; ".join(f"{b}x3x{h}x{w}: max rel. err {e:.1e}" for (b, h, w), e in self.checks)
        sizes = (f"any batch, H and W multiples of {self.size_multiple} from {self.min_size}" if self.dynamic
                 else "the example size only (--static)")
        return (f"wrote {self.path} ({self.format}, {self.task})\n"
                f"  inputs:  {fmt(self.inputs)}\n  outputs: {fmt(self.outputs)}\n"
                f"  sizes:   {sizes}\n  checked against eager PyTorch: {checked}")


def require_export_deps(fmt: str) -> None:
    """ONNX export and its check need onnx, onnxscript and onnxruntime (the ``export`` extra)."""
    if fmt != "onnx":
        return
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(mod)
        except ImportError:
            raise MissingDependency(f"ONNX export needs the optional package {mod!r}; install it with: {EXTRA}") \
                from None


def size_bounds(task: ExportTask, model: nn.Module) -> tuple[int, int]:
    """(multiple, smallest side) of the sizes ``model`` takes."""
    backbone = task.backbone(model)
    m = int(backbone.cfg.branches[0].max_stride)
    return m, int(math.ceil(backbone.smallest_input() / m) * m)


def _check_size(size: tuple[int, int], m: int, lo: int, what: str) -> None:
    for v in size:
        if v % m or v < lo:
            near = max(lo, round(v / m) * m)
            raise ValueError(f"{what} {size[0]}x{size[1]}: height and width must be multiples of {m} of at least "
                             f"{lo} for this model (e.g. {near})")


def check_out_path(out: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return check_output_file(out, "--out", "model." + fmt)


def _export_program(wrapper: nn.Module, args: tuple[Tensor, ...], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """torch.export (non-strict); a dynamic-shape constraint the tracer can state as a fix (a
    minimum size, say) is applied and the export retried once."""
    from torch._dynamo.exc import UserError
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
    for attempt in range(3):
        try:
            return torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
        except UserError as e:
            if dynamic_shapes is None or "Suggested fixes" not in str(e) or attempt == 2:
                raise ValueError("torch.export cannot follow this model's sizes dynamically "
                                 f"({_first_line(e)}); export it with --static") from e
            dynamic_shapes = refine_dynamic_shapes_from_suggested_fixes(str(e), dynamic_shapes)
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _runner(fmt: str, path: str) -> Callable[[tuple[Tensor, ...]], list[Tensor]]:
    """Run the file as written: onnxruntime for ONNX, torch.export.load for .pt2."""
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(inputs: tuple[Tensor, ...]) -> list[Tensor]:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
            return [torch.from_numpy(o) for o in sess.run(None, feed)]
        return run_onnx
    module = torch.export.load(path).module()

    def run_pt2(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        with torch.no_grad():
            return list(module(*inputs))
    return run_pt2


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (0 when both are empty)."""
    if want.numel() == 0 and got.numel() == 0:
        return 0.0
    scale = want.detach().float().abs().max().clamp_min(1e-12)
    return float((got.detach().float().cpu() - want.detach().float().cpu()).abs().max() / scale.cpu())


def check_sizes(size: tuple[int, int], m: int) -> list[tuple[int, int, int]]:
    """Two (batch, H, W) other than the example's: larger (a smaller size could drop a branch's
    grid to one token), neither square nor the example's aspect ratio, batch 1 and 3."""
    h, w = size
    return [(1, h + m, w + 2 * m), (3, h + 2 * m, w + m)]


def export_model(model: nn.Module, format: str, out: str, example_size: Union[int, Sequence[int], None] = None,
                 dynamic: bool = True, opset: Optional[int] = None, task: Optional[str] = None,
                 deform_impl: Optional[str] = None, check: Optional[Sequence[tuple[int, int, int]]] = None,
                 tol: float = 1e-4) -> ExportResult:
    """Export ``model`` (a backbone, classifier, segmentor, or any registered task) to ``out``.

    Args:
        format: ``onnx`` (torch.onnx.export with dynamo=True) or ``pt2`` (torch.export.save).
        example_size: (H, W) or side of the example input (default: the model's resolution).
        dynamic: batch, H and W dynamic (multiples of the input stride); False = the example's only.
        opset: ONNX opset (default: the exporter's).
        task: force a task name of :data:`piip.export.tasks.TASKS` (default: by model type).
        deform_impl: deformable-attention implementation traced (default per format, DEFAULT_IMPL).
        check: (batch, H, W) sizes compared with eager (default: two other than the example's).
        tol: largest accepted relative error per output (max abs error / max abs eager value).
    Raises ValueError (bad size / format / path, export impossible), ExportCheckError (the written
    model disagrees with eager; nothing kept) and MissingDependency (the ``export`` extra).
    """
    folder = check_out_path(out, format)
    require_export_deps(format)
    spec = find_task(model, task)
    if format == "onnx" and dynamic and spec.onnx_dynamic_refusal:
        raise ValueError(spec.onnx_dynamic_refusal)
    model.eval()
    m, lo = size_bounds(spec, model)
    size = pair(example_size if example_size is not None else int(spec.backbone(model).cfg.branches[0].img_size))
    _check_size(size, m, lo, "example size")
    wrapper = spec.wrap(model).eval()
    example = spec.inputs(model, 2, size)   # batch 2: a batch of 1 would be specialised (0/1 rule)
    dyn = None
    if dynamic:
        from torch.export import Dim
        batch = Dim("batch", min=1, max=1024)
        hh = Dim("h", min=lo // m, max=MAX_SIDE // m)
        ww = Dim("w", min=lo // m, max=MAX_SIDE // m)
        dyn = spec.dynamic_shapes(model, batch, m * hh, m * ww)
    checks = list(check) if check is not None else (check_sizes(size, m) if dynamic else [(2, *size)])
    for _, h, w in checks:
        _check_size((h, w), m, lo, "check size")
    impl = deform_impl if deform_impl is not None else DEFAULT_IMPL[format]
    with torch.no_grad(), (use_impl(impl) if impl else contextlib.nullcontext()):
        program = _export_program(wrapper, example, dyn)
    out_names = list(spec.output_names(model))
    tmpdir = tempfile.mkdtemp(prefix=".piip-export-", dir=folder)
    try:
        tmp = os.path.join(tmpdir, os.path.basename(out))
        if format == "onnx":
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                             input_names=list(spec.input_names), output_names=out_names)
            onnx_program.save(tmp)
        else:
            torch.export.save(program, tmp)
        results = _verify(wrapper, spec, model, _runner(format, tmp), checks, out_names, tol)
        for name in os.listdir(tmpdir):   # the model, and ONNX external weights when there are any
            os.replace(os.path.join(tmpdir, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    ins, outs = _describe(program, spec.input_names, out_names)
    return ExportResult(out, format, spec.name, dynamic, ins, outs, results, m, lo)


def _verify(wrapper: nn.Module, spec: ExportTask, model: nn.Module, run: Callable, checks: Sequence[tuple[int, int, int]],
            names: list[str], tol: float) -> list[tuple[tuple[int, int, int], float]]:
    results = []
    for b, h, w in checks:
        inputs = spec.inputs(model, b, (h, w))
        with torch.no_grad():
            want = list(wrapper(*inputs))
        try:
            got = run(inputs)
        except Exception as e:  # noqa: BLE001 - a refusal at run time is a failed check, reported in one line
            raise ExportCheckError(f"the exported model fails on a {b}x3x{h}x{w} input ({_first_line(e)}); "
                                   "nothing was written") from e
        worst = 0.0
        for name, g, t in zip(names, got, want):
            if tuple(g.shape) != tuple(t.shape):
                raise ExportCheckError(f"output {name!r} at {b}x3x{h}x{w}: shape {tuple(g.shape)}, eager gives "
                                       f"{tuple(t.shape)}; nothing was written")
            if spec.close is not None:
                ok, msg = spec.close(g, t)
                if not ok:
                    raise ExportCheckError(f"output {name!r} at {b}x3x{h}x{w}: {msg}; nothing was written")
                continue
            err = relative_error(g, t)
            worst = max(worst, err)
            if not err <= tol:
                raise ExportCheckError(f"output {name!r} at {b}x3x{h}x{w} differs from eager PyTorch by {err:.2e} "
                                       f"(relative, > {tol:g}); nothing was written")
        results.append(((b, h, w), worst))
    return results


def _shape_text(shape: Sequence[Any], names: dict[Any, Any]) -> str:
    """Dims as text, symbolic ones in the input's names (``batch``, ``H``, ``W``): 'batch x 64 x H/4 x W/4'."""
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            out.append(str(d.node.expr.xreplace(names)).replace(" ", ""))
        else:
            out.append(str(d))
    return " x ".join(out)


def _describe(program: torch.export.ExportedProgram, in_names: Sequence[str],
              out_names: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, shape) of the program's inputs and outputs; an input dim m*s (s a dynamic size) reads H / W."""
    import sympy
    user = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    names: dict[Any, Any] = {}
    for node in placeholders:
        shape = node.meta["val"].shape
        labels = ["batch"] + [""] * (len(shape) - 3) + ["H", "W"] if len(shape) == 4 else ["", "H", "W"]
        for label, d in zip(labels, shape):
            if label and isinstance(d, torch.SymInt):
                expr = d.node.expr
                syms = list(expr.free_symbols)
                if len(syms) == 1:   # d = k * s  ->  s = label / k
                    coeff = expr / syms[0]
                    names[syms[0]] = sympy.Symbol(label) / coeff
    ins = [(name, _shape_text(n.meta["val"].shape, names)) for name, n in zip(in_names, placeholders)]
    node = next(n for n in program.graph.nodes if n.op == "output")
    outs = [(name, _shape_text(a.meta["val"].shape, names)) for name, a in zip(out_names, node.args[0])]
    return ins, outs
