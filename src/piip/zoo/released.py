"""Whole released models, built from their checkpoints: the backbone comes from
``piip.create_model(name, pretrained=True)``; the released Mask R-CNN also carries its neck and
heads, which :func:`released_detector` loads into a torchvision detector."""
from __future__ import annotations

import warnings
from typing import Optional

from ..weights.hub import RELEASES, download, no_release_message, released_file
from ..weights.io import read_state_dict
from ..weights.mmdet_heads import convert_mmdet_heads


def released_detector(name: str, cache_dir: Optional[str] = None, **overrides) -> "object":
    """The whole released Mask R-CNN of ``name``: its backbone and its mmdet neck and heads, converted
    to torchvision names (COCO's 80 classes, names attached)."""
    filename = released_file(name)
    if filename is None or not filename.startswith("detection/mask_rcnn_"):
        what = f"its release is {filename}" if filename else no_release_message(name)
        raise ValueError(f"--pretrained: {name} has no released Mask R-CNN ({what}); released Mask R-CNN models: "
                         f"{', '.join(n for n, f in sorted(RELEASES.items()) if f.startswith('detection/mask_rcnn_'))}")
    path = download(name, cache_dir)
    from ..data.coco import COCO_CLASSES
    from ..registry import create_model
    from ..tasks.detection import build_detector
    with warnings.catch_warnings():   # "neck/head tensors not loaded": they are, just below
        warnings.filterwarnings("ignore", message=".*neck/head tensors")
        body = create_model(name, checkpoint=path, **overrides)
    det = build_detector(body, len(COCO_CLASSES), "mask_rcnn")
    heads = convert_mmdet_heads(read_state_dict(path))
    missing, unexpected = det.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.body.")]   # loaded with the backbone above
    if missing or unexpected:
        raise ValueError(f"{path}: the neck/heads do not fit a {name} Mask R-CNN: {len(missing)} missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    det.det_cfg.class_names = list(COCO_CLASSES)
    return det
