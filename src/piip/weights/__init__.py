"""Weights: timm branches, official PIIP checkpoints, mmdet heads, our safetensors format."""
from .io import check_state_dict, read_state_dict, strict_load
from .mmdet_heads import convert_mmdet_heads
from .official import convert_official_state_dict, load_checkpoint, official_name, to_official_state_dict
from .official_match import describe_official_checkpoint, fit_config_to_checkpoint
from .pretrained import load_pretrained, save_pretrained, save_state_dict
from .timm_branch import BranchLoadReport, convert_timm_vit, describe_reports, load_pretrained_branches

__all__ = ["check_state_dict", "read_state_dict", "strict_load", "convert_mmdet_heads",
           "convert_official_state_dict", "describe_official_checkpoint", "fit_config_to_checkpoint",
           "load_checkpoint", "official_name", "to_official_state_dict",
           "load_pretrained", "save_pretrained", "save_state_dict", "BranchLoadReport", "convert_timm_vit",
           "describe_reports", "load_pretrained_branches"]
