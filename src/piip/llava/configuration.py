"""``PiipLlavaConfig``: a PIIP vision tower + a causal LM + the two-branch projector (llava_spec §7.2)."""
from __future__ import annotations

from typing import Any, Optional, Union

from transformers import AutoConfig, PretrainedConfig

from ..config import IMAGENET_MEAN, IMAGENET_STD, PIIPConfig

IMAGE_TOKEN_ID = -200                       # the official IMAGE_TOKEN_INDEX: outside every vocabulary
PAD_COLOR = tuple(int(255 * m) for m in IMAGENET_MEAN)   # (123, 116, 103): expand2square's background
DEFAULT_PROJECTOR = {"type": "separate_2branch_v1", "norm": "gn", "num_groups": 32}


def _text_config(text_config: Union[None, dict, PretrainedConfig]) -> PretrainedConfig:
    if isinstance(text_config, PretrainedConfig):
        return text_config
    from transformers import CONFIG_MAPPING
    d = dict(text_config or {})
    return CONFIG_MAPPING[d.pop("model_type", "llama")](**d)


class PiipLlavaConfig(PretrainedConfig):
    """``vision_config`` is a :class:`piip.PIIPConfig` dict (``task='features'``), ``text_config`` the
    LLM's config (any model ``AutoModel`` builds; Vicuna/Llama for the released models)."""

    model_type = "piip_llava"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, vision_config: Optional[dict[str, Any]] = None, text_config: Any = None,
                 projector: Optional[dict[str, Any]] = None, image_token_id: int = IMAGE_TOKEN_ID,
                 image_size: Optional[int] = None, image_mean: Any = IMAGENET_MEAN, image_std: Any = IMAGENET_STD,
                 image_aspect_ratio: str = "pad", pad_color: Any = PAD_COLOR, conv_template: str = "vicuna_v1",
                 model_max_length: int = 2048, ignore_index: int = -100, official_variant: Optional[str] = None,
                 **kwargs: Any) -> None:
        if vision_config is None:
            from ..zoo.llava import llava_tower
            vision_config = llava_tower("clip_bl_512_256").to_dict()
        vision_config = PIIPConfig.from_dict(vision_config).to_dict()   # validates the fields
        if vision_config.get("task") != "features" or len(vision_config["branches"]) != 2:
            raise ValueError("PiipLlavaConfig.vision_config must be a two-branch PIIP tower with task='features' "
                             "(e.g. piip.zoo.llava.llava_tower('clip_bl_512_256').to_dict())")
        self.vision_config = vision_config
        self.text_config = _text_config(text_config)
        self.projector = {**DEFAULT_PROJECTOR, **(projector or {})}
        if self.projector["type"] != "separate_2branch_v1" or self.projector["norm"] != "gn":
            raise ValueError(f"projector {self.projector} is not supported: only separate_2branch_v1 with norm 'gn'")
        self.image_token_id = int(image_token_id)
        self.image_size = int(image_size or round(vision_config["branches"][0]["img_size"]))
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        self.image_aspect_ratio, self.pad_color = image_aspect_ratio, list(pad_color)
        self.conv_template, self.model_max_length, self.ignore_index = conv_template, model_max_length, ignore_index
        self.official_variant = official_variant
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def piip_config(self) -> PIIPConfig:
        return PIIPConfig.from_dict(self.vision_config)

    @property
    def image_seq_length(self) -> int:
        """Visual tokens per image: the fine branch's final grid (nothing pooled, no CLS)."""
        side = self.image_size // self.piip_config.branches[0].max_stride
        return side * side
