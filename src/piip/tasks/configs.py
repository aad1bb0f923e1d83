"""What the task heads are built from, without torchvision: :class:`DetectorConfig` and
:class:`SegmentorConfig` (saved in checkpoints), the detector kinds, and the pyramid levels DINO
reads. Light on purpose: the command line builds its head options from these fields
(:func:`cli_field`, read by :mod:`piip.commands._config_args`) without importing the heads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import strict_from_dict
from ..data.segmentation import IGNORE_INDEX   # labels the segmentor's loss skips

KINDS = ("mask_rcnn", "faster_rcnn", "retinanet", "dino", "cascade_mask_rcnn")
# kinds that predict instance masks (their training sets load masks)
MASK_KINDS = ("mask_rcnn", "cascade_mask_rcnn")
AUGS = ("single", "ms")
DINO_PYRAMID_LEVELS = (1, 2, 3)   # strides 8 / 16 / 32, the released is_dino outputs


def cli_field(default: Any, group: str, help: Optional[str] = None, **extra: Any) -> Any:
    """A field with ``default`` that is also an option of the command's option ``group``; ``extra``:
    ``choices`` (accepted words), ``minimum=0`` (0 allowed), ``maximum=1`` (a fraction in [0, 1])."""
    return field(default=default, metadata={"cli": group, "help": help, **extra})


@dataclass
class DetectorConfig:
    """Everything besides the backbone needed to rebuild a detector (saved in checkpoints).

    Defaults are the released Mask R-CNN 1x settings. ``max_size`` None = the finest branch's
    resolution S; ``min_size`` None = S, so the long side of every image becomes S (keep ratio).
    The released mmdet pipeline caps the short side too: ``min_size = S * 800 // 1333``
    (``img_scale=(S, S*800//1333)``) reproduces its evaluation protocol.
    ``pad_divisor`` None = 224 for multi-branch PIIP, 64 for a single-branch ViTDet (released
    configs), lowered to 32 when S < 224 so tiny models don't train on mostly padding.
    """

    kind: str = cli_field("mask_rcnn", "detector", choices=KINDS)
    num_classes: int = 80
    fpn_channels: int = cli_field(256, "detector")
    box_head_dim: int = cli_field(1024, "detector")          # Shared2FC box head width
    mask_head_dim: int = cli_field(256, "detector")          # FCN mask head width (4 convs)
    min_size: Optional[int] = cli_field(None, "detector", help="short-side cap (default: none, the long side "
                                        "becomes the finest resolution S; S*800//1333 is the released mmdet protocol)")
    max_size: Optional[int] = cli_field(None, "detector", help="long-side cap (default: finest branch resolution)")
    # anchor side = anchor_scale x level stride (mmdet scales=[8]: 32..512 px)
    anchor_scale: float = cli_field(8.0, "detector", help="anchor side = this x level stride (released: 8, i.e. "
                                                          "32..512 px anchors for ~1000 px images; use ~2 for images "
                                                          "of ~128 px)")
    rpn_pre_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_train: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_size: int = cli_field(256, "detector", help="anchors sampled per image for the RPN loss (released: 256)")
    roi_batch_size: int = cli_field(512, "detector", help="proposals sampled per image for the box/mask heads "
                                                          "(released: 512, sized for ~1333x800 images; small images "
                                                          "with few objects learn faster with ~64)")
    pad_divisor: Optional[int] = cli_field(None, "detector", help="pad to multiples of this (default 224 / 64 / 32)")
    score_thresh: float = 0.05
    detections_per_img: Optional[int] = None   # None = 300 for DINO (released top-300), 100 otherwise
    class_names: list[str] = field(default_factory=list)
    # 'single' = one fixed scale, resized by the model's transform; 'ms' = the data pipeline already
    # picked the training scale (vision_spec D.3), so the transform does not resize training images
    aug: str = "single"
    # DINO (kind='dino'), defaults = the released DINO 4-scale configs
    num_queries: int = cli_field(900, "dino")
    transformer_dim: int = cli_field(256, "dino")
    transformer_heads: int = cli_field(8, "dino")
    transformer_points: int = 4
    transformer_ffn: int = cli_field(2048, "dino")
    enc_layers: int = cli_field(6, "dino")
    dec_layers: int = cli_field(6, "dino")
    dn_queries: int = cli_field(100, "dino", help="denoising queries (0 = no denoising)", minimum=0)
    dn_label_noise: float = 0.5
    dn_box_noise: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        return strict_from_dict(cls, d, "detector")


@dataclass
class SegmentorConfig:
    """Everything besides the backbone needed to rebuild a segmentor (saved in checkpoints).

    Defaults: released UperNet (pool scales 1/2/3/6, dropout 0.1, FCN aux on level 2 with one conv,
    weight 0.4). ``channels`` is 512 / 1024 / 1536 in the recipes (ViT-Adapter B / L, InternViT).
    ``crop_size`` None = the finest branch's resolution; ``stride`` None = 2/3 of it (released
    512 / 341); ``test_size`` None = crop_size (short side of test images before sliding).
    """

    num_classes: int = 150
    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: Optional[int] = 256      # None = no auxiliary head
    aux_index: int = 2
    aux_num_convs: int = 1
    aux_weight: float = cli_field(0.4, "segmentor", minimum=0)
    dropout: float = cli_field(0.1, "segmentor", maximum=1)
    crop_size: Optional[int] = None
    stride: Optional[int] = None
    test_size: Optional[int] = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool_scales = tuple(int(s) for s in self.pool_scales)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.num_classes >= IGNORE_INDEX:
            raise ValueError(f"num_classes must be < {IGNORE_INDEX} (the ignore index), got {self.num_classes}")
        if self.channels < 1 or (self.aux_channels is not None and self.aux_channels < 1):
            raise ValueError(f"channels / aux_channels must be >= 1, got {self.channels} / {self.aux_channels}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.aux_index <= 3:
            raise ValueError(f"aux_index must be a pyramid level 0..3, got {self.aux_index}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pool_scales"] = list(self.pool_scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmentorConfig":
        return strict_from_dict(cls, d, "segmentor")
