"""Detector export (torch.export ``.pt2`` and ONNX): one image in, the eager detections out.

The exported program takes one ``(3, H, W)`` float image in [0, 1] of any height and width (the
detector's own transform resizes, normalises and pads it, symbolically) and returns ``boxes (N, 4)``
(xyxy, input pixels), ``labels (N,)``, ``scores (N,)`` and, for Mask R-CNN / Cascade Mask R-CNN,
``masks (N, 1, H, W)`` (probabilities), in that order: what ``model([image])[0]`` returns.

torchvision's detectors are written for its legacy TorchScript ONNX path; under torch.export two of
its helpers stop at a data-dependent branch: ``batched_nms`` (``GuardOnDataDependentSymNode: Could
not guard on data-dependent expression Eq(4*u1, 0)`` at ``torchvision/ops/boxes.py`` in
``_batched_nms_coordinate_trick``, its ``boxes.numel() == 0`` test) and ``_topk_min`` (Python
``min`` of k and a dynamic count). :func:`exportable_torchvision` swaps both, inside
:class:`DetectorForExport`'s forward only, for versions without the branch that return the same
result (the coordinate-trick NMS torchvision itself runs on CPU for up to 1000 boxes). ONNX is written from the exported
program (``torch.onnx.export(..., dynamo=True)``), so both formats share one trace.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

OUTPUTS = ("boxes", "labels", "scores")
MIN_SIDE = 32          # smallest image side the exported program accepts
MAX_SIDE = 4096        # largest


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The exported outputs in order: boxes, labels, scores (+ masks for the mask kinds)."""
    from .detection import MASK_KINDS
    return OUTPUTS + (("masks",) if model.det_cfg.kind in MASK_KINDS else ())


class DetectorForExport(nn.Module):
    """``model([image])[0]`` as a tuple (boxes, labels, scores[, masks]) of one (3, H, W) image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = output_names(model)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        with exportable_torchvision():       # whichever exporter traces this forward sees the swap
            out = self.model([image])[0]
        return tuple(out[k] for k in self.names)


def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's coordinate-trick batched NMS without its ``numel() == 0`` early return (the
    zero appended to the max keeps an empty input valid): same kept indices, score-sorted."""
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    shifted = boxes + (idxs.to(boxes) * (top + 1))[:, None]
    return torch.ops.torchvision.nms(shifted, scores, iou_threshold)


def _topk_min(x: Tensor, k: int, axis: int) -> Any:
    """``min(k, x.size(axis))`` that stays symbolic instead of guarding on the comparison."""
    return torch.sym_min(k, x.size(axis))


@contextlib.contextmanager
def exportable_torchvision() -> Iterator[None]:
    """While exporting: torchvision's ``batched_nms`` / ``_topk_min`` as data-independent versions."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops
    saved = box_ops.batched_nms, det_utils._topk_min
    box_ops.batched_nms, det_utils._topk_min = _batched_nms, _topk_min
    try:
        yield
    finally:
        box_ops.batched_nms, det_utils._topk_min = saved


def _example(example_size: Sequence[int], device: torch.device) -> Tensor:
    h, w = (int(example_size[0]), int(example_size[1]))
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ValueError(f"example size {h}x{w} is outside {MIN_SIDE}..{MAX_SIDE} px per side")
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)).to(device)


def coarsest_stride(model: nn.Module) -> int:
    """Stride of the detector's coarsest feature map (RetinaNet P7 = 128, otherwise 64)."""
    return 128 if model.det_cfg.kind == "retinanet" else 64


def default_example_size(model: nn.Module) -> tuple[int, int]:
    """A square image at the detector's resize target (the finest branch's resolution)."""
    s = int(model.transform.max_size)
    return s, s


def _check_example(model: nn.Module, image: Tensor) -> None:
    """torch.export fixes every size that is 1 at the example; the coarsest maps of a small image
    are 1 px, so such an example would give a program that only takes that shape class."""
    with torch.no_grad():
        padded = model.transform([image])[0].tensors.shape[-2:]
    stride = coarsest_stride(model)
    if min(padded) < 2 * stride:
        raise ValueError(f"example size {image.shape[-2]}x{image.shape[-1]} is {padded[0]}x{padded[1]} after the "
                         f"detector's resize and pad, so its stride-{stride} maps are 1 px (torch.export would fix "
                         f"them at 1 for every input); export with a larger example (each side >= {2 * stride} "
                         f"after resize, i.e. a model --img-size >= {2 * stride})")


def export_program(model: nn.Module, example_size: Optional[Sequence[int]] = None,
                   static: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export`` of :class:`DetectorForExport` with dynamic H and W (unless ``static``);
    ``example_size`` defaults to :func:`default_example_size`. An exporter failure becomes one
    ValueError line naming the upstream error."""
    model = model.eval()
    wrapper = DetectorForExport(model).eval()
    device = next(model.parameters()).device
    image = _example(example_size or default_example_size(model), device)
    if not static:
        _check_example(model, image)
    dims = None
    if not static:
        dims = ({1: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
                 2: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)},)
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (image,), dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"torch.export cannot export this {model.det_cfg.kind} detector"
                         f"{'' if static else ' with a dynamic height/width'}: {type(e).__name__}: {first}") from e


def export_detector(model: nn.Module, fmt: str, out: str, example_size: Optional[Sequence[int]] = None,
                    static: bool = False, opset: Optional[int] = None,
                    program: Optional["torch.export.ExportedProgram"] = None) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` ('pt2' = torch.export archive, 'onnx') to ``out``.

    ``program``: an :func:`export_program` result to write instead of exporting again (both
    formats from one trace). Returns {path, format, inputs, outputs, dynamic}. The caller checks
    the written file against eager with :func:`check_detector_export` at other sizes."""
    from ..export.core import check_out_path
    check_out_path(out, fmt)
    ep = program if program is not None else export_program(model, example_size, static)
    if fmt == "pt2":
        torch.export.save(ep, out)
    else:
        from ..errors import require
        require("onnxscript", "ONNX export")
        kwargs = {} if opset is None else {"opset_version": opset}
        try:
            torch.onnx.export(ep, (), out, input_names=["image"], output_names=list(output_names(model)),
                              dynamo=True, verbose=False, **kwargs)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"ONNX conversion of the exported {model.det_cfg.kind} detector failed: "
                             f"{type(e).__name__}: {first}") from e
    hw = "H x W" if not static else "x".join(str(int(s)) for s in example_size or default_example_size(model))
    return {"path": out, "format": fmt, "inputs": {"image": f"(3, {hw}) float32 RGB in [0, 1]"},
            "outputs": list(output_names(model)), "dynamic": not static}


def compare_detections(eager: Sequence[Tensor], exported: Sequence[Tensor]) -> dict[str, float]:
    """Max abs differences per output after sorting both by score (then box), or inf where the
    number of detections differs."""
    if eager[0].shape[0] != exported[0].shape[0]:
        return {"count": float("inf")}

    def order(out: Sequence[Tensor]) -> Tensor:
        key = out[2].double() * 1e6 + out[0][:, 0].double() * 1e-3   # score first, ties by x0
        return key.argsort(descending=True)

    ia, ib = order(eager), order(exported)
    diffs = {}
    for name, a, b in zip(OUTPUTS + ("masks",), eager, exported):
        a, b = a[ia].float(), b[ib].float()
        diffs[name] = float((a - b).abs().max()) if a.numel() else 0.0
    return diffs


def check_detector_export(model: nn.Module, path: str, fmt: str, sizes: Sequence[Sequence[int]],
                          box_tol: float = 1e-3) -> dict[tuple[int, int], dict[str, float]]:
    """Run the written model and eager on random images of ``sizes``; ValueError (one line) when a
    size gives a different number of detections, labels, or boxes off by more than ``box_tol``."""
    from ..export.core import _runner
    run = _runner(fmt, path)
    model = model.eval()
    device = next(model.parameters()).device
    results = {}
    for size in sizes:
        image = _example(size, device)
        with torch.no_grad():
            eager = DetectorForExport(model)(image)
        diffs = compare_detections(eager, run((image,)))
        results[(int(size[0]), int(size[1]))] = diffs
        if diffs.get("count") == float("inf") or diffs["boxes"] > box_tol or diffs["labels"] > 0:
            raise ValueError(f"the exported {fmt} detector differs from eager at {size[0]}x{size[1]}: {diffs}")
    return results


def is_detector(model: nn.Module) -> bool:
    from .detection import KINDS
    cfg = getattr(model, "det_cfg", None)
    return cfg is not None and getattr(cfg, "kind", None) in KINDS


def _task_inputs(model: nn.Module, batch: int, size: tuple[int, int]) -> tuple[Tensor, ...]:
    """One (3, H, W) image: detectors export unbatched (``batch`` is ignored)."""
    return (_example(size, next(model.parameters()).device),)


def _task_dims(model: nn.Module, batch: object, height: object, width: object) -> dict[str, object]:
    return {"image": {1: height, 2: width}}


def _close(got: Tensor, want: Tensor) -> tuple[bool, str]:
    """Same detections: same count and every value (boxes in pixels, labels, scores, mask
    probabilities) within 1e-3."""
    if got.shape != want.shape:
        return False, f"{tuple(got.shape[:1])} detections, eager has {tuple(want.shape[:1])}"
    diff = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
    return diff <= 1e-3, f"max abs diff {diff:.3g}"


def export_task() -> Any:
    """The detectors' entry in ``piip export``'s task table (:mod:`piip.export.tasks`)."""
    from ..export.tasks import ExportTask
    return ExportTask("detection", is_detector, DetectorForExport, ["image"], lambda m: list(output_names(m)),
                      lambda m: m.backbone.body, inputs=_task_inputs, dynamic_shapes=_task_dims, close=_close)
