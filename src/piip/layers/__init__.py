"""Building blocks shared by every branch count and task."""
from .attention import Attention, CrossAttention
from .deform_attn import MSDeformAttn
from .interaction import Injector, InteractionEdge, InteractionGroup, default_edges
from .merge import BranchMerge
from .mlp import ConvFFN, Mlp
from .pyramid import LayerNorm2d, SimpleFeaturePyramid

__all__ = ["Attention", "CrossAttention", "MSDeformAttn", "Injector", "InteractionEdge", "InteractionGroup",
           "default_edges", "BranchMerge", "ConvFFN", "Mlp", "LayerNorm2d", "SimpleFeaturePyramid"]
