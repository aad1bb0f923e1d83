"""Evaluation metrics."""
from .coco import COCO_METRIC_NAMES, coco_evaluate, evaluate_detector, predictions_to_coco

__all__ = ["COCO_METRIC_NAMES", "coco_evaluate", "evaluate_detector", "predictions_to_coco"]
