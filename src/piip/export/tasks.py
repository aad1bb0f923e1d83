"""What each kind of model exports as: a wrapper whose forward takes plain tensors and returns a
tuple of tensors, the input / output names, and how its inputs are made for a size.

Tasks are looked up in :data:`TASKS` in order, first match wins; another task plugs in with
:func:`register_task`. The built-in entries (bare backbones, classifiers, segmentors, detectors)
come from :mod:`piip.tasks.registry`, which adds a source of entries with :func:`add_export_source`
(read on the first lookup): this module imports nothing above ``torch``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class ExportTask:
    """How one kind of model is exported.

    ``wrap(model)`` returns the module handed to the exporter; its forward takes ``inputs(model,
    batch, size)``'s tensors and returns a tuple of tensors named ``output_names(model)``.
    ``dynamic_shapes(model, batch, height, width)`` maps the wrapper's arguments to their dynamic
    dims given the three ``torch.export.Dim`` (``batch`` None for unbatched inputs).
    ``backbone(model)`` is the PIIP backbone (its stride and smallest input bound the sizes).
    ``close(got, want)`` -> (ok, error text) compares one output with eager (default: 1e-4
    relative to the output's largest magnitude). ``onnx_dynamic_refusal``: the one-line reason a
    dynamic-size ONNX export of this task is refused (it would be wrong at other sizes).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    wrap: Callable[[nn.Module], nn.Module]
    input_names: Sequence[str]
    output_names: Callable[[nn.Module], list[str]]
    backbone: Callable[[nn.Module], nn.Module]
    inputs: Callable[[nn.Module, int, tuple[int, int]], tuple[Tensor, ...]] = None  # type: ignore[assignment]
    dynamic_shapes: Callable[..., object] = None  # type: ignore[assignment]
    close: Optional[Callable[[Tensor, Tensor], tuple[bool, str]]] = None
    onnx_dynamic_refusal: Optional[str] = None   # why a dynamic-size ONNX export is refused (None: allowed)

    def __post_init__(self) -> None:
        self.inputs = self.inputs or batched_images
        self.dynamic_shapes = self.dynamic_shapes or batched_dims


TASKS: list[ExportTask] = []
# callables giving more entries, added to TASKS (after the built-in ones) before the first lookup
_SOURCES: list[Callable[[], Iterable[ExportTask]]] = []


def add_export_source(source: Callable[[], Iterable[ExportTask]]) -> None:
    """Entries of another layer (the task table), read lazily so that neither imports the other's models."""
    _SOURCES.append(source)


def _read_sources() -> None:
    while _SOURCES:
        for task in _SOURCES.pop(0)():
            if all(t.name != task.name for t in TASKS):   # an entry registered by name already wins
                TASKS.append(task)


def register_task(task: ExportTask, first: bool = True) -> ExportTask:
    """Add (or replace, by name) a task; ``first`` puts it before the built-in ones."""
    _read_sources()
    TASKS[:] = [t for t in TASKS if t.name != task.name]
    TASKS.insert(0 if first else len(TASKS), task)
    return task


def find_task(model: nn.Module, name: Optional[str] = None) -> ExportTask:
    _read_sources()
    for t in TASKS:
        if (name is None or t.name == name) and t.matches(model):
            return t
    known = ", ".join(t.name for t in TASKS)
    what = f"as task {name!r} " if name else ""
    raise ValueError(f"cannot export a {type(model).__name__} {what}(exportable: {known})")


def batched_images(model: nn.Module, batch: int, size: tuple[int, int]) -> tuple[Tensor, ...]:
    """One float (B, 3, H, W) batch in [0, 1], on the model's device, seeded for repeatability."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(batch * 100003 + size[0] * 1009 + size[1])
    return (torch.rand(batch, 3, *size, generator=g).to(p.device),)


def batched_dims(model: nn.Module, batch: object, height: object, width: object) -> dict[str, object]:
    return {"images": {0: batch, 2: height, 3: width}}


class TupleOutputs(nn.Module):
    """``model(images)`` with its dict / tensor result returned as a tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images)
        if isinstance(out, Tensor):
            return (out,)
        return tuple(out.values())


def backbone_outputs(model: nn.Module) -> list[str]:
    """Output names of a PIIP backbone: one per pyramid level (``features`` without a pyramid)."""
    if model.pyramid is None:
        return ["features"]
    levels = model.pyramid.levels
    return [f"stride{model.out_strides[lv]}" for lv in levels]


def image_task(name: str, cls: type, output_names: Callable[[nn.Module], list[str]],
               backbone: Callable[[nn.Module], nn.Module]) -> ExportTask:
    """The entry of a model class whose forward takes a (B, 3, H, W) batch and returns a tensor or a dict."""
    return ExportTask(name, lambda m: isinstance(m, cls), TupleOutputs, ["images"], output_names, backbone)
