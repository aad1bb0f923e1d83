"""Datasets, transforms and collate functions."""
from .classification import ImageClassification, build_transforms, classification_collate
from .coco import COCO_CLASSES, CocoDetection
from .transforms import (Compose, RandomCrop, RandomHorizontalFlip, Resize, detection_collate, detection_ms_transforms,
                         detection_train_transforms)

__all__ = ["ImageClassification", "build_transforms", "classification_collate", "COCO_CLASSES", "CocoDetection", "Compose", "RandomHorizontalFlip", "Resize", "detection_collate",
           "detection_train_transforms", "detection_ms_transforms", "RandomCrop"]
