"""Operators: deformable attention and window partitioning, pure PyTorch."""
from .ms_deform_attn import (available_impls, ms_deform_attn, ms_deform_attn_points, ms_deform_attn_reference,
                             register_impl)
from . import deform_fused, deform_triton  # noqa: F401  (register the fast implementations)
from .window import window_partition, window_unpartition

__all__ = ["ms_deform_attn", "ms_deform_attn_points", "ms_deform_attn_reference", "register_impl", "available_impls",
           "window_partition", "window_unpartition"]
