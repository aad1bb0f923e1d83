"""DINO (DETR with improved denoising anchor boxes) on PIIP backbones, as the released mmdet 2.x
port the PIIP configs use: ChannelMapper neck, deformable transformer with two-stage mixed query
selection, look-forward-twice box refinement and contrastive denoising."""
from .model import DINO, DinoBackbone

__all__ = ["DINO", "DinoBackbone"]
