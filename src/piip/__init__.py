"""piip: Parameter-Inverted Image Pyramid Networks in plain PyTorch."""
from . import zoo as _zoo  # noqa: F401  (registers the paper's configurations)
from .backbone import PIIPBackbone
from .branches import Branch, Tokens, ViTBranch
from .config import BranchConfig, PIIPConfig
from .ops import ms_deform_attn
from .registry import (build_from_config, create_model, describe_model, from_pretrained, get_config, list_models,
                       register_model)
from .tasks.classification import PIIPClassifier
from .weights import save_pretrained
from .integrations.timm import install as _install_timm

_install_timm()   # piip names in timm's registry (when timm is imported, which piip itself does not do)

__version__ = "0.1.0"

__all__ = ["PIIPBackbone", "PIIPClassifier", "Branch", "Tokens", "ViTBranch", "BranchConfig", "PIIPConfig",
           "ms_deform_attn", "create_model", "list_models", "get_config", "describe_model", "register_model",
           "build_from_config", "save_pretrained", "from_pretrained", "__version__"]
