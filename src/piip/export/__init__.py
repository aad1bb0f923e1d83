"""Deployment: torch.export / ONNX export of PIIP models with dynamic batch, height and width,
checked against eager PyTorch (``piip export``). Needs the ``export`` extra for ONNX
(onnx, onnxscript, onnxruntime), imported only when used."""
from .core import FORMATS, ExportCheckError, ExportResult, export_model, relative_error
from .tasks import TASKS, ExportTask, find_task, register_task

__all__ = ["export_model", "ExportResult", "ExportCheckError", "ExportTask", "register_task", "find_task",
           "TASKS", "FORMATS", "relative_error"]
