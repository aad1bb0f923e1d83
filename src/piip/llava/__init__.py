"""PIIP-LLaVA on Hugging Face transformers (``pip install 'piip[llava]'``).

Importing this package registers model type ``piip_llava`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageTextToText``; ``import piip`` alone never imports transformers.
"""
from __future__ import annotations

from ..errors import MissingDependency

try:
    import transformers  # noqa: F401
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise MissingDependency(f"PIIP-LLaVA needs Hugging Face transformers ({_e}); install it with: "
                            "pip install 'piip[llava]'") from None

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText  # noqa: E402

from .configuration import IMAGE_TOKEN_ID, PiipLlavaConfig  # noqa: E402
from .modeling import (PiipLlavaForConditionalGeneration, PiipLlavaModel, PiipLlavaPreTrainedModel,  # noqa: E402
                       TwoBranchProjector)
from .processing import PiipLlavaImageProcessor, PiipLlavaProcessor, TEMPLATES  # noqa: E402


def register() -> None:
    """Register ``piip_llava`` with the Auto classes (idempotent; done on import)."""
    try:
        AutoConfig.register(PiipLlavaConfig.model_type, PiipLlavaConfig)
        AutoModel.register(PiipLlavaConfig, PiipLlavaModel)
        AutoModelForImageTextToText.register(PiipLlavaConfig, PiipLlavaForConditionalGeneration)
    except ValueError:  # already registered
        pass


register()


from .official import convert_official, detect_variant, from_official  # noqa: E402


__all__ = ["IMAGE_TOKEN_ID", "PiipLlavaConfig", "PiipLlavaModel", "PiipLlavaPreTrainedModel",
           "PiipLlavaForConditionalGeneration", "TwoBranchProjector", "PiipLlavaImageProcessor",
           "PiipLlavaProcessor", "TEMPLATES", "register", "from_official", "convert_official", "detect_variant"]
