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

from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,  # noqa: E402
                          AutoProcessor)

from .configuration import IMAGE_TOKEN_ID, PiipLlavaConfig  # noqa: E402
from .modeling import (PiipLlavaForConditionalGeneration, PiipLlavaModel, PiipLlavaPreTrainedModel,  # noqa: E402
                       TwoBranchProjector)
from .image_processing import PiipLlavaImageProcessor  # noqa: E402
from .processing import PiipLlavaProcessor, TEMPLATES  # noqa: E402


def register() -> None:
    """Register ``piip_llava`` with the Auto classes (idempotent; done on import): config, models,
    ``AutoProcessor`` and ``AutoImageProcessor``, so a saved folder loads through any of them."""
    AutoConfig.register(PiipLlavaConfig.model_type, PiipLlavaConfig, exist_ok=True)
    AutoModel.register(PiipLlavaConfig, PiipLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(PiipLlavaConfig, PiipLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(PiipLlavaConfig, PiipLlavaProcessor, exist_ok=True)
    # one class for both backends: its pixels are computed with PIL + torch either way
    AutoImageProcessor.register(PiipLlavaConfig, image_processor_classes={"pil": PiipLlavaImageProcessor,
                                                                          "torchvision": PiipLlavaImageProcessor},
                                exist_ok=True)


register()


from .official import convert_official, detect_variant, from_official  # noqa: E402


__all__ = ["IMAGE_TOKEN_ID", "PiipLlavaConfig", "PiipLlavaModel", "PiipLlavaPreTrainedModel",
           "PiipLlavaForConditionalGeneration", "TwoBranchProjector", "PiipLlavaImageProcessor",
           "PiipLlavaProcessor", "TEMPLATES", "register", "from_official", "convert_official", "detect_variant"]
