"""Semantic segmentation: a PIIP backbone's four pyramid maps under UperNet (+ FCN auxiliary head),
set up like the released mmseg UperNet configs (``vision_spec`` §E.2).

Module layout::

    segmentor.backbone        the PIIPBackbone (pyramid '0'..'3' at strides 4/8/16/32)
    segmentor.decode_head     UperNet: pyramid pooling (1/2/3/6) on level 3 + FPN fusion of all levels
    segmentor.auxiliary_head  FCN on level 2 (loss weight 0.4), training only

The heads are plain PyTorch, written with the module and parameter names of Hugging Face
transformers' ``UperNetHead`` / ``UperNetFCNHead`` (``psp_modules``, ``bottleneck``,
``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``classifier``; ``conv``/``batch_norm``
per block), so their state dicts load into each other (``tests/test_segmentation.py`` checks the
outputs agree). Why not transformers' ``UperNetForSemanticSegmentation`` itself: it has no dropout
before the classifiers (released: 0.1), its ``post_init`` re-initialises every submodule through
the transformers initialiser (the backbone's pretrained branches included), and it would make
transformers a hard dependency of the core; piip never imports transformers.

Inputs are float RGB in [0, 1]; the segmentor normalises with the backbone's ``image_norm`` and
pads right/bottom to the backbone's input stride, so any (H, W) works. Labels: ``0..K-1``, 255 =
ignore.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import PIIPBackbone
from ..config import IMAGE_NORMS, PIIPConfig
from ..layers.conv import Conv2d
from ..ops.symbolic import concrete
from .detection import _as_backbone
from .configs import IGNORE_INDEX, SegmentorConfig

# ---------------------------------------------------------------------- heads (HF-compatible names)
class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU (transformers' ``UperNetConvModule``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        # piip's Conv2d: nn.Conv2d's parameters and keys; eager CPU inference runs the wide 3x3
        # ones (the FPN convs and the fuse on the stride-4 map) through Winograd (piip.ops.winograd)
        self.conv = Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.batch_norm = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        bn = self.batch_norm
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1 and type(bn) is nn.BatchNorm2d:
            # one value per channel (the 1x1 pyramid pooling of a batch of one, e.g. an epoch's
            # last partial batch): batch statistics are undefined, normalise with the running ones
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            x = bn(x)
        return self.activation(x)


def _bin_matrix(n: "int | torch.SymInt", bins: int, like: Tensor) -> Tensor:
    """(bins, n) averaging matrix of adaptive pooling's bins: row i is 1 / len over
    [floor(i n / bins), ceil((i + 1) n / bins)) and 0 elsewhere. Bounds are tensors of the size, not
    slices: a slice of length 1 at the example would be specialised (torch.export guards it)."""
    i = torch.arange(bins, device=like.device)
    start = i * n // bins
    end = ((i + 1) * n + bins - 1) // bins     # ceil on non-negative ints (ONNX's integer Div truncates)
    j = torch.arange(n, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that, while exporting, averages its integer bins by two matrix products.

    The ONNX exporter translates ``adaptive_avg_pool2d`` (output > 1) with the example's kernel
    and stride baked in, so the graph is wrong at any other size (UperNet logits 5.7e-2 relative
    off at 112x160 after an export at 96x128). Eager runs PyTorch's kernel unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            return super().forward(x)
        size = self.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        return _bin_matrix(x.shape[2], oh, x) @ x @ _bin_matrix(x.shape[3], ow, x).transpose(0, 1)


class PoolingBlock(nn.Sequential):
    """AdaptiveAvgPool(scale) -> 1x1 ConvModule; children named '0', '1' as in transformers."""

    def __init__(self, scale: int, cin: int, cout: int) -> None:
        super().__init__(AdaptiveAvgPool2d(scale), ConvModule(cin, cout, 1))


class PyramidPooling(nn.ModuleList):
    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [F.interpolate(block(x), size=x.shape[2:], mode="bilinear", align_corners=False) for block in self]


class UperNetHead(nn.Module):
    """PPM on the coarsest level, lateral 1x1 + top-down sum, 3x3 FPN convs, concat, 3x3 fuse, classify."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.psp_modules = PyramidPooling(PoolingBlock(s, in_channels[-1], channels) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, 1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, 1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """``num_convs`` 3x3 ConvModules on one level, then dropout + 1x1 classifier (``concat_input=False``)."""

    def __init__(self, cin: int, channels: int, num_classes: int, in_index: int = 2, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(cin if i == 0 else channels, channels, 3, 1)
                                     for i in range(num_convs))) if num_convs else nn.Identity()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels if num_convs else cin, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.convs(feats[self.in_index])))


def _init_head(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------- segmentor
class PIIPSegmentor(nn.Module):
    """PIIP backbone + UperNet (+ FCN aux). ``forward(images)`` -> logits (B, K, H, W) at the input
    size; ``loss(images, masks)`` = ``forward(images, masks)`` -> ``{'loss_decode', 'loss_aux'}``
    (cross entropy, ignore 255)."""

    def __init__(self, backbone: PIIPBackbone, seg_cfg: SegmentorConfig) -> None:
        super().__init__()
        if backbone.pyramid is None or len(backbone.out_channels) != 4:
            raise ValueError("segmentation needs a backbone with the 4-level pyramid (pyramid='gn' or 'ln')")
        self.backbone, self.seg_cfg = backbone, seg_cfg
        ch = list(backbone.out_channels)
        k = seg_cfg.num_classes
        self.decode_head = UperNetHead(ch, seg_cfg.channels, k, seg_cfg.pool_scales, seg_cfg.dropout)
        self.auxiliary_head = FCNHead(ch[seg_cfg.aux_index], seg_cfg.aux_channels, k, seg_cfg.aux_index,
                                      seg_cfg.aux_num_convs, seg_cfg.dropout) \
            if seg_cfg.aux_channels is not None else None
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                head.apply(_init_head)
                nn.init.normal_(head.classifier.weight, std=0.01)   # mmseg conv_seg init
        mean, std = IMAGE_NORMS[backbone.cfg.image_norm]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ sizes
    @property
    def size_divisor(self) -> int:
        return int(self.backbone.cfg.branches[0].max_stride)

    @property
    def crop_size(self) -> int:
        return int(self.seg_cfg.crop_size or self.backbone.cfg.branches[0].img_size)

    @property
    def slide_stride(self) -> int:
        return int(self.seg_cfg.stride or max(1, self.crop_size * 2 // 3))

    @property
    def test_size(self) -> int:
        return int(self.seg_cfg.test_size or self.crop_size)

    # ------------------------------------------------------------------ forward
    def _check(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"segmentor input must be a (B, 3, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if not torch.is_floating_point(images):
            raise ValueError(f"segmentor input must be float RGB in [0, 1], got {images.dtype}")

    def _logits(self, images: Tensor, with_aux: bool) -> tuple[Tensor, Optional[Tensor]]:
        self._check(images)
        h, w = images.shape[-2:]
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if not concrete((ph, pw)) or ph or pw:  # symbolic sizes (export): pad, maybe by 0, rather than guard
            x = F.pad(x, (0, pw, 0, ph))
        feats = list(self.backbone(x).values())
        hp, wp = x.shape[-2:]
        out = F.interpolate(self.decode_head(feats), size=(hp, wp), mode="bilinear", align_corners=False)[..., :h, :w]
        aux = None
        if with_aux and self.auxiliary_head is not None:
            aux = F.interpolate(self.auxiliary_head(feats), size=(hp, wp), mode="bilinear",
                                align_corners=False)[..., :h, :w]
        return out, aux

    def forward(self, images: Tensor, masks: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Logits (B, K, H, W) at the input size (whole-image inference); with ``masks``, the loss
        dict of :meth:`loss` (the training entry point, so DDP wraps one call)."""
        if masks is not None:
            return self.loss(images, masks)
        return self._logits(images, False)[0]

    def loss(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the decode head (+ ``aux_weight`` x the FCN head's); 255 is ignored."""
        if masks.dim() != 3 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"masks must be (B, H, W) matching images {tuple(images.shape)}, got {tuple(masks.shape)}")
        masks = masks.long()
        bad = (masks != IGNORE_INDEX) & ((masks < 0) | (masks >= self.seg_cfg.num_classes))
        if bad.any():
            raise ValueError(f"mask value {int(masks[bad][0])} is not a class id 0..{self.seg_cfg.num_classes - 1} "
                             f"or {IGNORE_INDEX} (ignore)")
        out, aux = self._logits(images, True)
        valid = (masks != IGNORE_INDEX).any()
        losses = {"loss_decode": _ce(out, masks, valid)}
        if aux is not None:
            losses["loss_aux"] = self.seg_cfg.aux_weight * _ce(aux, masks, valid)
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor, mode: str = "slide") -> Tensor:
        """Logits (B, K, H, W) by sliding ``crop_size`` windows with ``slide_stride`` ('slide', the
        released test mode) or in one pass ('whole')."""
        if mode == "whole":
            return self(images)
        if mode != "slide":
            raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
        return slide_inference(self, images, self.crop_size, self.slide_stride)


def _ce(logits: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
    loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
    # an all-ignore batch gives NaN (0/0): keep the graph, contribute 0
    return torch.where(valid, loss, logits.sum() * 0.0)


def slide_inference(model: nn.Module, images: Tensor, crop: int, stride: int) -> Tensor:
    """mmseg ``slide`` mode: overlapping ``crop`` windows every ``stride`` px (the last one flush with
    the border), logits summed and divided by the per-pixel window count. An image smaller than
    the crop is one window of its own size."""
    if stride < 1 or crop < 1:
        raise ValueError(f"crop and stride must be >= 1, got {crop} / {stride}")
    b, _, h, w = images.shape
    gh = max(h - crop + stride - 1, 0) // stride + 1
    gw = max(w - crop + stride - 1, 0) // stride + 1
    out: Optional[Tensor] = None
    count = images.new_zeros((1, 1, h, w))
    for i in range(gh):
        for j in range(gw):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logit = model(images[:, :, y1:y2, x1:x2]).float()
            if out is None:
                out = images.new_zeros((b, logit.shape[1], h, w), dtype=torch.float32)
            out[:, :, y1:y2, x1:x2] += logit
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


# ---------------------------------------------------------------------- building / loading
def build_segmentor(backbone: Union[PIIPBackbone, str, PIIPConfig], num_classes: int = 150,
                    seg_cfg: Optional[SegmentorConfig] = None, **overrides: Any) -> PIIPSegmentor:
    """A PIIP UperNet segmentor.

    Args:
        backbone: a built :class:`PIIPBackbone`, a registered model name, or a :class:`PIIPConfig`.
        num_classes: number of classes K (150 for ADE20K; labels 0..K-1, 255 ignored).
        seg_cfg: head / inference settings; ``num_classes`` given here wins.
        **overrides: backbone config overrides when ``backbone`` is a name or config.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cfg = dataclasses.replace(seg_cfg or SegmentorConfig(), num_classes=num_classes)
    return PIIPSegmentor(_as_backbone(backbone, overrides, "segmentation"), cfg)


def segmentor_config_dict(model: PIIPSegmentor) -> dict[str, Any]:
    """What :func:`segmentor_from_config` needs to rebuild ``model`` (stored in checkpoints)."""
    return {"task": "segmentation", "backbone": model.backbone.cfg.to_dict(), "segmentor": model.seg_cfg.to_dict()}


def segmentation_forward(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
    """Loss dict of a segmentor on one collated (images, masks) batch (``forward(images, masks)`` is the
    loss, so DDP sees the call)."""
    images, masks = batch
    images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    return model(images, masks)


def predict_segmentation(model: PIIPSegmentor, image: Tensor) -> Tensor:
    """(H, W) class map of one uint8 (3, H, W) RGB image: resized so its short side is the test
    size, sliding-window logits, resized back."""
    device = next(model.parameters()).device
    h, w = image.shape[-2:]
    s = model.test_size / min(h, w)
    x = F.interpolate(image[None].float().div(255), size=(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))),
                      mode="bilinear", align_corners=False).clamp(0, 1).to(device)
    with torch.no_grad():
        logits = model.predict(x, "slide")
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].cpu()


def segmentor_from_config(d: dict[str, Any]) -> PIIPSegmentor:
    if d.get("task") != "segmentation":
        raise ValueError(f"not a segmentation model config (task={d.get('task')!r})")
    cfg = SegmentorConfig.from_dict(d["segmentor"])
    return build_segmentor(PIIPConfig.from_dict(d["backbone"]), cfg.num_classes, cfg)


def load_segmentor(path: str, map_location: str = "cpu") -> PIIPSegmentor:
    """A segmentor from a ``piip train segmentation`` checkpoint (rebuilt from the config inside it)."""
    from ..weights.io import read_checkpoint
    from .registry import rebuild_trained
    ckpt: Any = read_checkpoint(path, weights_only=True, map_location=map_location)
    if not (isinstance(ckpt, dict) and "model_config" in ckpt):
        raise ValueError(f"{path} holds no model config: give a checkpoint written by `piip train segmentation`")
    return rebuild_trained(path, ckpt, "segmentation", "segmentor")


def export_task() -> Any:
    """Segmentors' entry in ``piip export``'s task table: a (B, 3, H, W) batch in, ``logits`` out."""
    from ..export.tasks import image_task
    return image_task("segmentation", PIIPSegmentor, lambda m: ["logits"], lambda m: m.backbone)
