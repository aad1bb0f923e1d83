"""Object detection / instance segmentation: a PIIP (or ViTDet) backbone under torchvision's
Mask R-CNN, Faster R-CNN or RetinaNet, set up like the released mmdet Mask R-CNN 1x config.

Module layout (what checkpoint conversion relies on)::

    detector.backbone.body   the PIIPBackbone (pyramid '0'..'3' at strides 4/8/16/32)
    detector.backbone.fpn    torchvision FeaturePyramidNetwork (256 channels)
    detector.rpn / detector.roi_heads / detector.head (RetinaNet)
    detector.transform       resize + normalise + pad (see :class:`PIIPDetectionTransform`)

Labels follow torchvision: foreground classes are ``1..num_classes`` and ``num_classes`` given to
:func:`build_detector` counts foreground classes only (80 for COCO); every head is built with
``num_classes + 1`` outputs (index 0 = background; unused by RetinaNet's sigmoid classifier).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..backbone import PIIPBackbone
from ..config import IMAGE_NORMS, PIIPConfig
from .configs import AUGS, DINO_PYRAMID_LEVELS, KINDS, MASK_KINDS, DetectorConfig

ROI_STRIDES = (4, 8, 16, 32)     # the FPN levels '0'..'3' that RoIAlign reads


def resolve_sizes(backbone_cfg: PIIPConfig, det: DetectorConfig) -> tuple[int, int, int]:
    """(min_size, max_size, pad_divisor) the transform uses for this backbone."""
    s = int(round(backbone_cfg.branches[0].img_size))
    max_size = det.max_size or s
    min_size = det.min_size or max_size
    if det.pad_divisor is not None:
        pad = det.pad_divisor
    else:
        pad = 224 if len(backbone_cfg.branches) > 1 else 64
        if max_size < 224:
            pad = 32
    stride = backbone_cfg.branches[0].max_stride
    if pad % stride:
        raise ValueError(f"pad_divisor={pad} must be a multiple of the finest branch's input stride {stride}")
    return min_size, max_size, pad


class PIIPFPN(nn.Module):
    """``body`` (PIIP backbone) -> selected pyramid levels -> ``fpn`` (torchvision FPN)."""

    def __init__(self, body: PIIPBackbone, out_channels: int = 256, levels: tuple[str, ...] = ("0", "1", "2", "3"),
                 extra: str = "maxpool") -> None:
        super().__init__()
        if body.pyramid is None:
            raise ValueError("detection needs a backbone with a feature pyramid (config pyramid='gn' or 'ln')")
        self.body = body
        self.levels = tuple(levels)
        channels = [body.out_channels[int(k)] for k in self.levels]  # per level (regular FPN: per-group widths)
        if extra == "maxpool":
            extra_block = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(channels[-1], out_channels)  # mmdet add_extra_convs='on_input'
        else:
            raise ValueError(f"extra must be 'maxpool' or 'p6p7', got {extra!r}")
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((k, feats[k]) for k in self.levels))


def backbone_with_fpn(name: str, out_channels: int = 256, **overrides: Any) -> PIIPFPN:
    """torchvision's custom-backbone contract (as ``BackboneWithFPN`` + ``LastLevelMaxPool``): a module
    with an int ``out_channels`` whose forward gives an OrderedDict of 5 maps ('0'..'3' at strides
    4..32, 'pool' at 64), so ``FasterRCNN(bb, num_classes=K)`` / ``MaskRCNN(bb, num_classes=K)`` work
    with torchvision's default anchors and RoI pooling. ``overrides`` go to :func:`piip.create_model`
    (``pretrained=True``, ``img_size=...``, config fields)."""
    from ..registry import create_model
    body = create_model(name, **overrides)
    if not isinstance(body, PIIPBackbone) or body.cfg.task != "dense" or body.pyramid is None \
            or body.pyramid.levels != [0, 1, 2, 3]:
        raise ValueError(f"{name} is not a dense backbone with all four pyramid levels; torchvision's detectors "
                         "need one (e.g. piip_tsb_1120_896_448)")
    return PIIPFPN(body, out_channels)


class FixedStrideAnchorGenerator(AnchorGenerator):
    """Anchors at the nominal level strides (mmdet), not ``padded_size // grid`` (torchvision),
    which is off for the max-pooled level when the padded size is not a multiple of 64."""

    def __init__(self, sizes: tuple, aspect_ratios: tuple, strides: tuple[int, ...]) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"anchor generator has {len(self.strides)} strides, got {len(feature_maps)} levels")
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with ``aligned=True`` (half-pixel offset), as mmcv's RoIAlign in mmdet.
    Level assignment (canonical 224 at level 4) equals mmdet's finest_scale=56 rule.

    ``strides`` (one per level) fix the scales up front; torchvision infers them from the first
    batch's sizes through ``float(size)``, which torch.export turns into a fixed image size."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int,
                 strides: Optional[tuple[int, ...]] = None) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio)
        if strides is not None:
            from torchvision.ops.poolers import initLevelMapper
            if len(strides) != len(featmap_names):
                raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
            self.scales = [1.0 / s for s in strides]
            self.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                              self.canonical_scale, self.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            from torchvision.ops.poolers import _setup_scales
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], 0)
        rois = rois.to(feats[0].dtype)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + tuple(self.output_size))
        for lvl, (f, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == lvl)[0]   # may be empty: no numel() branch, which torch.export cannot follow
            out[idx] = roi_align(f, rois[idx], self.output_size, scale, self.sampling_ratio,
                                 aligned=True).to(out.dtype)
        return out


class PIIPDetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform configured as the released pipeline.

    Images come in as RGB floats in [0, 1]. Resize keeps the ratio with
    ``scale = min(max_size / long side, min_size / short side)`` (mmdet ``Resize(img_scale=
    (max_size, min_size), keep_ratio=True)``; torchvision uses the same rule), normalise with
    mean = std = 0.5 (= 127.5 on 0-255 RGB; ``norm='half'``, the released ViT configs) or the
    ImageNet mean/std (``norm='imagenet'``, what ConvNeXt / hybrid weights were trained with), pad
    bottom/right with zeros to a multiple of ``size_divisible``. ``postprocess`` maps boxes and
    masks back to the original image size.
    """

    def __init__(self, min_size: int, max_size: int, size_divisible: int, norm: str = "half",
                 resize_train: bool = True) -> None:
        if norm not in IMAGE_NORMS:
            raise ValueError(f"image_norm must be one of {sorted(IMAGE_NORMS)}, got {norm!r}")
        mean, std = IMAGE_NORMS[norm]
        super().__init__(min_size, max_size, image_mean=list(mean), image_std=list(std),
                         size_divisible=size_divisible)
        self.resize_train = resize_train

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):  # noqa: ANN201
        """No resize of training images when the data pipeline chose their scale (``aug='ms'``).
        Inference images take :func:`resize_keep_ratio` (torchvision's rule, written so that
        torch.export keeps the size symbolic); the legacy ONNX tracer keeps torchvision's path."""
        if self.training and not self.resize_train:
            return image, target
        if target is None and not self.training and not torchvision._is_tracing():
            return resize_keep_ratio(image, self.min_size[-1], self.max_size), None
        return super().resize(image, target)

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        """Zero-pad bottom/right to a common multiple of ``size_divisible`` (torchvision's result;
        its version turns the size into a float, which fixes it under torch.export)."""
        if torchvision._is_tracing():
            return super().batch_images(images, size_divisible)
        h = functools.reduce(torch.sym_max, [im.shape[-2] for im in images])
        w = functools.reduce(torch.sym_max, [im.shape[-1] for im in images])
        d = size_divisible   # ceil on non-negative ints: ONNX's Div truncates, so -(-h // d) crops instead
        h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        return torch.stack([F.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im in images])

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Boxes back to the original image (and masks pasted there); the ratios are Python
        scalars, not ``torch.tensor(size)`` (a constant under torch.export)."""
        if self.training or torchvision._is_tracing():
            return super().postprocess(result, image_shapes, original_image_sizes)
        for pred, (h, w), (oh, ow) in zip(result, image_shapes, original_image_sizes):
            x0, y0, x1, y1 = pred["boxes"].unbind(1)
            rw, rh = ow / w, oh / h
            pred["boxes"] = torch.stack((x0 * rw, y0 * rh, x1 * rw, y1 * rh), 1)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], oh, ow)
        return result


def _paste_weights(lo: Tensor, size: Tensor, length: Any, m: int) -> Tensor:
    """(N, length, m) weights of a bilinear (align_corners=False) resize of m cells onto the
    integer span [lo, lo + size) of a line of ``length`` pixels; zero outside the span."""
    pix = torch.arange(length, device=lo.device, dtype=torch.float32)[None] - lo[:, None].float()  # (N, length)
    scale = m / size.float()[:, None]
    src = ((pix + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long().clamp(max=m - 1)
    i1 = (i0 + 1).clamp(max=m - 1)
    inside = ((pix >= 0) & (pix < size.float()[:, None])).float()
    cells = torch.arange(m, device=lo.device)
    return inside[..., None] * ((1 - frac)[..., None] * (cells == i0[..., None]).float()
                                + frac[..., None] * (cells == i1[..., None]).float())


def paste_masks(masks: Tensor, boxes: Tensor, height: Any, width: Any, padding: int = 1) -> Tensor:
    """(N, 1, M, M) mask probabilities pasted into (N, 1, height, width) images at ``boxes``.

    torchvision's ``paste_masks_in_image`` (pad the mask by one cell, widen the box to match,
    round it to integers, bilinear-resize the mask onto it) as one separable product
    ``Wy @ mask @ Wx^T`` instead of a loop over detections, so that torch.export can follow a
    data-dependent number of detections. Values agree with torchvision to float rounding."""
    m = masks.shape[-1] + 2 * padding
    padded = F.pad(masks[:, 0], (padding,) * 4)
    scale = m / (m - 2 * padding)
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    lo, hi = (centre - half).long(), (centre + half).long()
    size = (hi - lo + 1).clamp(min=1)
    wy = _paste_weights(lo[:, 1], size[:, 1], height, m)
    wx = _paste_weights(lo[:, 0], size[:, 0], width, m)
    return (wy @ padded.float() @ wx.transpose(1, 2))[:, None].to(masks.dtype)


def resize_keep_ratio(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """(C, H, W) resized by ``min(min_size / short side, max_size / long side)``, bilinear, output
    size ``floor(side x scale)``: torchvision's eval resize with sizes kept symbolic (sym_min)."""
    h, w = image.shape[-2:]
    scale = torch.sym_min(min_size / torch.sym_min(h, w), max_size / torch.sym_max(h, w))
    size = [torch.sym_int(h * scale), torch.sym_int(w * scale)]   # = floor (positive); serialisable in .pt2
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _as_backbone(backbone: Union[PIIPBackbone, str, PIIPConfig], overrides: dict[str, Any],
                 task: str = "detection") -> PIIPBackbone:
    """A built dense backbone from a backbone, a registered name or a config (+ overrides)."""
    if isinstance(backbone, PIIPBackbone):
        if overrides:
            raise ValueError("model overrides can only be given with a model name or config, not a built backbone")
        return backbone
    if isinstance(backbone, str):
        from ..registry import get_config
        backbone = get_config(backbone, **overrides)
    elif isinstance(backbone, PIIPConfig):
        backbone = backbone.replace(**overrides) if overrides else backbone
    else:
        raise ValueError(f"backbone must be a PIIPBackbone, a registered model name or a PIIPConfig, "
                         f"got {type(backbone).__name__}")
    if backbone.task != "dense":
        raise ValueError(f"{task} needs a dense backbone config (task='dense'), got task={backbone.task!r}")
    return PIIPBackbone(backbone)


def build_detector(backbone: Union[PIIPBackbone, str, PIIPConfig], num_classes: int = 80,
                   kind: str = "mask_rcnn", det_cfg: Optional[DetectorConfig] = None,
                   **overrides: Any) -> nn.Module:
    """A torchvision detector on a PIIP / ViTDet backbone.

    Args:
        backbone: a built :class:`PIIPBackbone`, a registered model name, or a :class:`PIIPConfig`.
        num_classes: number of foreground classes (80 for COCO).
        kind: 'mask_rcnn', 'faster_rcnn', 'retinanet', 'dino' or 'cascade_mask_rcnn'.
        det_cfg: head / transform settings; ``num_classes`` and ``kind`` given here win.
        **overrides: backbone config overrides when ``backbone`` is a name or config
            (e.g. ``img_size=224, branches={'embed_dim': 32}``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (foreground classes), got {num_classes!r}")
    det = dataclasses.replace(det_cfg or DetectorConfig(), kind=kind, num_classes=num_classes)
    if det.aug not in AUGS:
        raise ValueError(f"aug must be one of {AUGS}, got {det.aug!r}")
    if kind == "dino" and not isinstance(backbone, PIIPBackbone):
        overrides = {"pyramid_levels": list(DINO_PYRAMID_LEVELS), **overrides}   # build only the maps DINO reads
    body = _as_backbone(backbone, overrides)
    min_size, max_size, pad = resolve_sizes(body.cfg, det)
    transform = PIIPDetectionTransform(min_size, max_size, pad, body.cfg.image_norm, resize_train=det.aug != "ms")
    per_img = det.detections_per_img or (300 if kind == "dino" else 100)
    if kind == "dino":
        from .dino import DINO
        model: nn.Module = DINO(body, num_classes, transform, det.transformer_dim, det.transformer_heads, 4,
                                det.transformer_points, det.transformer_ffn, det.enc_layers, det.dec_layers,
                                det.num_queries, det.dn_queries, det.dn_label_noise, det.dn_box_noise, per_img)
        model.det_cfg = det
        return model
    n_out = num_classes + 1
    ratios = (0.5, 1.0, 2.0)
    if kind == "retinanet":
        neck = PIIPFPN(body, det.fpn_channels, levels=("1", "2", "3"), extra="p6p7")
        base = det.anchor_scale / 2   # mmdet RetinaNet: octave_base_scale 4 on strides 8..128
        sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (base * t for t in (8, 16, 32, 64, 128)))
        anchors = FixedStrideAnchorGenerator(sizes, (ratios,) * 5, (8, 16, 32, 64, 128))
        model = RetinaNet(neck, n_out, anchor_generator=anchors, score_thresh=det.score_thresh,
                          detections_per_img=per_img, topk_candidates=1000, nms_thresh=0.5)
    else:
        neck = PIIPFPN(body, det.fpn_channels)
        anchors = FixedStrideAnchorGenerator(tuple((det.anchor_scale * t,) for t in (4, 8, 16, 32, 64)),
                                             (ratios,) * 5,
                                             (4, 8, 16, 32, 64))
        from torchvision.models.detection.faster_rcnn import TwoMLPHead, FastRCNNPredictor
        box_pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=0, strides=ROI_STRIDES)
        common = dict(
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=det.rpn_pre_nms_train, rpn_pre_nms_top_n_test=det.rpn_pre_nms_test,
            rpn_post_nms_top_n_train=det.rpn_post_nms_train, rpn_post_nms_top_n_test=det.rpn_post_nms_test,
            rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
            rpn_batch_size_per_image=det.rpn_batch_size, rpn_positive_fraction=0.5,
            box_roi_pool=box_pool,
            box_head=TwoMLPHead(det.fpn_channels * 7 * 7, det.box_head_dim),
            box_predictor=FastRCNNPredictor(det.box_head_dim, n_out),
            box_score_thresh=det.score_thresh, box_nms_thresh=0.5, box_detections_per_img=per_img,
            box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=det.roi_batch_size,
            box_positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0))
        if kind in MASK_KINDS:
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
            masks = dict(mask_roi_pool=AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 0, ROI_STRIDES),
                         mask_head=MaskRCNNHeads(det.fpn_channels, [det.mask_head_dim] * 4, 1),
                         mask_predictor=MaskRCNNPredictor(det.mask_head_dim, det.mask_head_dim, n_out))
            if kind == "cascade_mask_rcnn":
                from .cascade import CascadeRoIHeads
                common["box_head"] = common["box_predictor"] = None  # replaced by the cascade's stages below
                model = MaskRCNN(neck, n_out, **common)
                model.roi_heads = CascadeRoIHeads(box_pool, det.fpn_channels * 7 * 7, det.box_head_dim, n_out,
                                                  det.roi_batch_size, 0.25, det.score_thresh, 0.5, per_img, **masks)
            else:
                model = MaskRCNN(neck, None, **common, **masks)
        else:
            model = FasterRCNN(neck, None, **common)
    model.transform = transform
    model.det_cfg = det
    return model


def detector_config_dict(model: nn.Module) -> dict[str, Any]:
    """What :func:`detector_from_config` needs to rebuild ``model`` (stored in checkpoints)."""
    return {"task": "detection", "backbone": model.backbone.body.cfg.to_dict(), "detector": model.det_cfg.to_dict()}


def detection_forward(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
    """Loss dict of a torchvision detector on one collated batch (the Trainer's step)."""
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return model(images, targets)


def predict_detections(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    """``boxes`` / ``labels`` / ``scores`` (+ ``masks``) of one uint8 (3, H, W) RGB image, in its pixels."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model([image.float().div(255).to(device)])[0]


def detector_from_config(d: dict[str, Any]) -> nn.Module:
    """Rebuild a detector (random weights) from :func:`detector_config_dict`'s output."""
    if d.get("task") != "detection":
        raise ValueError(f"not a detection model config (task={d.get('task')!r})")
    det = DetectorConfig.from_dict(d["detector"])
    return build_detector(PIIPConfig.from_dict(d["backbone"]), det.num_classes, det.kind, det)


def load_detector(path: str, model: Optional[str] = None, overrides: Optional[dict[str, Any]] = None,
                  num_classes: int = 80, kind: str = "mask_rcnn", map_location: str = "cpu") -> nn.Module:
    """A detector from a training checkpoint (rebuilt from the config inside it) or from a plain
    state dict (``.pt``/``.pth``/``.safetensors`` with detector keys), which needs ``model``."""
    from ..weights.io import read_checkpoint
    from .registry import rebuild_trained
    ckpt: Any = read_checkpoint(path, weights_only=True, map_location=map_location)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        return rebuild_trained(path, ckpt, "detection", "detector")
    if model is None:
        raise ValueError(f"{path} holds no model config; pass the model name (--model) it was trained with")
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    det = build_detector(model, num_classes, kind, **(overrides or {}))
    missing, unexpected = det.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {model} ({kind}, {num_classes} classes): {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return det
