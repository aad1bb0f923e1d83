"""Datasets, transforms and collate functions."""
from .coco import COCO_CLASSES, CocoDetection
from .transforms import Compose, RandomHorizontalFlip, Resize, detection_collate, detection_train_transforms

__all__ = ["COCO_CLASSES", "CocoDetection", "Compose", "RandomHorizontalFlip", "Resize", "detection_collate",
           "detection_train_transforms"]
