"""The task table: what every task head on the PIIP backbone offers the rest of piip.

One :class:`Task` per task, keyed by its name, which is also the ``task`` field of the
``model_config`` its training checkpoints carry and its ``piip train`` / ``piip eval``
sub-command. Each entry names its functions in its module; they are imported on first use, so
reading the table (the command-line parser does) imports neither torchvision nor the heads.
Adding a task = one module with these six functions + one entry in :data:`TASKS`. The table also
hands ``piip export`` each task's export entry (:func:`piip.export.tasks.add_export_source`), so
:mod:`piip.export` imports nothing from here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..export.tasks import ExportTask, add_export_source, backbone_outputs, image_task


@dataclass(frozen=True)
class Task:
    """One task's entry points, each a ``"module:function"`` imported on first use.

    ``build(config)``: the model (random weights) from a checkpoint's ``model_config`` dict.
    ``load(path)``: the model of a checkpoint written by ``piip train NAME``.
    ``recognises(path)``: whether ``path`` is such a checkpoint (False for anything unreadable).
    ``predict(model, image)``: the model's answer for one uint8 (3, H, W) RGB image.
    ``config_dict(model)``: the ``model_config`` dict its checkpoints store (``build``'s input).
    ``export_task()``: its :class:`piip.export.ExportTask` (what ``piip export`` writes for it).
    """

    name: str
    build_fn: str
    load_fn: str
    predict_fn: str
    config_fn: str
    export_fn: str

    @staticmethod
    def _fn(spec: str) -> Callable[..., Any]:
        module, attr = spec.split(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, config: dict[str, Any]) -> Any:
        return self._fn(self.build_fn)(config)

    def load(self, path: str, **kw: Any) -> Any:
        return self._fn(self.load_fn)(path, **kw)

    def recognises(self, path: str) -> bool:
        return checkpoint_task(path) == self.name

    def predict(self, model: Any, image: Any, **kw: Any) -> Any:
        return self._fn(self.predict_fn)(model, image, **kw)

    def config_dict(self, model: Any) -> dict[str, Any]:
        return self._fn(self.config_fn)(model)

    def export_task(self) -> Any:
        return self._fn(self.export_fn)()


_DET, _CLS, _SEG = "piip.tasks.detection:", "piip.tasks.classification_train:", "piip.tasks.segmentation:"
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("detection", _DET + "detector_from_config", _DET + "load_detector", _DET + "predict_detections",
         _DET + "detector_config_dict", "piip.tasks.detection_export:export_task"),
    Task("classification", _CLS + "classifier_from_config", _CLS + "classifier_from_checkpoint", _CLS + "classify",
         _CLS + "classifier_config_dict", "piip.tasks.classification:export_task"),
    Task("segmentation", _SEG + "segmentor_from_config", _SEG + "load_segmentor", _SEG + "predict_segmentation",
         _SEG + "segmentor_config_dict", _SEG + "export_task"),
)}
# piip export's lookup order (first match wins; its error message lists them in this order)
_EXPORT_ORDER = ("classification", "segmentation", "detection")


def model_task(ckpt: Any) -> Optional[str]:
    """The ``task`` of a loaded checkpoint's ``model_config`` (None: a plain state dict or weights)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
        return ckpt["model_config"].get("task")
    return None


def checkpoint_task(path: str) -> Optional[str]:
    """:func:`model_task` of the file at ``path``; None for anything unreadable (the caller's
    loader then reports it).

    Only ``model_config`` is needed, so the tensors are memory-mapped rather than read (the caller
    reads the file again to load it; a training checkpoint with optimizer state is GBs), and an FSDP
    run's shards are not gathered. A safetensors file holds tensors only, never a ``model_config``."""
    from ..weights.io import read_checkpoint
    if os.fspath(path).endswith(".safetensors"):
        return None
    for mmap in (True, False):   # the legacy non-zip format cannot be mapped: read it whole
        try:
            ckpt = read_checkpoint(path, weights_only=True, map_location="cpu", consolidate_shards=False, mmap=mmap)
        except Exception:  # noqa: BLE001 - not ours to report
            continue
        return model_task(ckpt)
    return None


def rebuild_trained(path: str, ckpt: dict[str, Any], task: str, noun: str, key: str = "model") -> Any:
    """The model a ``piip train TASK`` checkpoint ``ckpt`` (read from ``path``) holds: rebuilt from its
    ``model_config`` by the task's builder, then strictly loaded from ``ckpt[key]``; a checkpoint of
    another task is refused in one line naming ``noun`` (what the caller wanted)."""
    from ..weights.io import check_state_dict
    found = ckpt["model_config"].get("task")
    if found != task:
        raise ValueError(f"{path} holds a {found} model, not a {noun}")
    model = TASKS[task].build(ckpt["model_config"])
    check_state_dict(model, ckpt[key], path)
    model.load_state_dict(ckpt[key])
    return model


def find_task(path: str) -> Optional[Task]:
    """The task whose checkpoint ``path`` is, or None (not a piip training checkpoint)."""
    return TASKS.get(checkpoint_task(path) or "")


def _export_tasks() -> Iterator[ExportTask]:
    """The built-in entries of :data:`piip.export.tasks.TASKS` (added on its first lookup): bare
    backbones, then the task models."""
    from ..backbone import PIIPBackbone
    yield image_task("backbone", PIIPBackbone, backbone_outputs, lambda m: m)
    for name in _EXPORT_ORDER:
        yield TASKS[name].export_task()


add_export_source(_export_tasks)
