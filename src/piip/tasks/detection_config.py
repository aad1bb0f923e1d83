"""What a detector is built from, without torchvision: :class:`DetectorConfig` (saved in
checkpoints), the detector kinds, and the pyramid levels DINO reads. Light on purpose: the
command line builds its head options from these fields (``metadata['cli']`` names the option
group, ``metadata['help']`` its help) without importing the detectors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import strict_from_dict

KINDS = ("mask_rcnn", "faster_rcnn", "retinanet", "dino", "cascade_mask_rcnn")
# kinds that predict instance masks (their training sets load masks)
MASK_KINDS = ("mask_rcnn", "cascade_mask_rcnn")
AUGS = ("single", "ms")
DINO_PYRAMID_LEVELS = (1, 2, 3)   # strides 8 / 16 / 32, the released is_dino outputs


def _cli(default: Any, group: str = "detector", help: Optional[str] = None, **extra: Any) -> Any:
    """A field that is also a ``piip train detection`` option of ``group`` (one default for both)."""
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

    kind: str = _cli("mask_rcnn", choices=KINDS)
    num_classes: int = 80
    fpn_channels: int = _cli(256)
    box_head_dim: int = _cli(1024)          # Shared2FC box head width
    mask_head_dim: int = _cli(256)          # FCN mask head width (4 convs)
    min_size: Optional[int] = _cli(None, help="short-side cap (default: none, the long side becomes the finest "
                                              "resolution S; S*800//1333 is the released mmdet protocol)")
    max_size: Optional[int] = _cli(None, help="long-side cap (default: finest branch resolution)")
    # anchor side = anchor_scale x level stride (mmdet scales=[8]: 32..512 px)
    anchor_scale: float = _cli(8.0, help="anchor side = this x level stride (released: 8, i.e. 32..512 px anchors "
                                         "for ~1000 px images; use ~2 for images of ~128 px)")
    rpn_pre_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_train: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_size: int = _cli(256, help="anchors sampled per image for the RPN loss (released: 256)")
    roi_batch_size: int = _cli(512, help="proposals sampled per image for the box/mask heads (released: 512, sized "
                                         "for ~1333x800 images; small images with few objects learn faster with "
                                         "~64)")
    pad_divisor: Optional[int] = _cli(None, help="pad to multiples of this (default 224 / 64 / 32)")
    score_thresh: float = 0.05
    detections_per_img: Optional[int] = None   # None = 300 for DINO (released top-300), 100 otherwise
    class_names: list[str] = field(default_factory=list)
    # 'single' = one fixed scale, resized by the model's transform; 'ms' = the data pipeline already
    # picked the training scale (vision_spec D.3), so the transform does not resize training images
    aug: str = "single"
    # DINO (kind='dino'), defaults = the released DINO 4-scale configs
    num_queries: int = _cli(900, "dino")
    transformer_dim: int = _cli(256, "dino")
    transformer_heads: int = _cli(8, "dino")
    transformer_points: int = 4
    transformer_ffn: int = _cli(2048, "dino")
    enc_layers: int = _cli(6, "dino")
    dec_layers: int = _cli(6, "dino")
    dn_queries: int = _cli(100, "dino", help="denoising queries (0 = no denoising)", minimum=0)
    dn_label_noise: float = 0.5
    dn_box_noise: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        return strict_from_dict(cls, d, "detector")
