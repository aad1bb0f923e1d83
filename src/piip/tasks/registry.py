"""The task table: what every task head on the PIIP backbone offers the rest of piip.

One :class:`Task` per task, keyed by its name, which is also the ``task`` field of the
``model_config`` its training checkpoints carry and its ``piip train`` / ``piip eval``
sub-command. Each entry names its functions in its module; they are imported on first use, so
reading the table (the command-line parser does) imports neither torchvision nor the heads.
Adding a task = one module with these five functions + one line in :data:`TASKS`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Task:
    """One task's entry points (function names in ``module``).

    ``build(config)``: the model (random weights) from a checkpoint's ``model_config`` dict.
    ``load(path)``: the model of a checkpoint written by ``piip train NAME``.
    ``recognises(path)``: whether ``path`` is such a checkpoint (False for anything unreadable).
    ``predict(model, image)``: the model's answer for one uint8 (3, H, W) RGB image.
    ``config_dict(model)``: the ``model_config`` dict its checkpoints store (``build``'s input).
    """

    name: str
    module: str
    build_fn: str
    load_fn: str
    predict_fn: str
    config_fn: str

    def _fn(self, attr: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), attr)

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


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("detection", "piip.tasks.detection", "detector_from_config", "load_detector", "predict_detections",
         "detector_config_dict"),
    Task("classification", "piip.tasks.classification_train", "classifier_from_config", "classifier_from_checkpoint",
         "classify", "classifier_config_dict"),
    Task("segmentation", "piip.tasks.segmentation", "segmentor_from_config", "load_segmentor", "predict_segmentation",
         "segmentor_config_dict"),
)}


def model_task(ckpt: Any) -> Optional[str]:
    """The ``task`` of a loaded checkpoint's ``model_config`` (None: a plain state dict or weights)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_config"), dict):
        return ckpt["model_config"].get("task")
    return None


def checkpoint_task(path: str) -> Optional[str]:
    """:func:`model_task` of the file at ``path``; None for anything unreadable (the caller's
    loader then reports it)."""
    from ..weights.io import read_checkpoint
    try:
        ckpt = read_checkpoint(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - not ours to report
        return None
    return model_task(ckpt)


def find_task(path: str) -> Optional[Task]:
    """The task whose checkpoint ``path`` is, or None (not a piip training checkpoint)."""
    return TASKS.get(checkpoint_task(path) or "")
