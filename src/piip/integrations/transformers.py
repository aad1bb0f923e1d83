"""PIIP as a Hugging Face transformers ``AutoBackbone`` (needs ``transformers``; ``import piip`` does
not import this module).

Importing it registers model type ``"piip"`` with ``AutoConfig`` / ``AutoBackbone``, so every
transformers head that takes a backbone config (``UperNetForSemanticSegmentation``, Mask2Former,
DPT, ...) can run on a PIIP backbone::

    from transformers import UperNetConfig, UperNetForSemanticSegmentation
    from piip.integrations.transformers import piip_backbone_config

    cfg = UperNetConfig(backbone_config=piip_backbone_config("piip_tsb_896_448_336_seg"), num_labels=150,
                        hidden_size=512, auxiliary_channels=256)
    model = UperNetForSemanticSegmentation(cfg)       # random weights; no hub download

Written for and tested with transformers 5.x (``piip[seg]`` asks for >= 5).

The backbone's stages are ``stage1..stage4`` = the PIIP pyramid at strides 4/8/16/32 (all four by
default; ``out_features`` / ``out_indices`` pick some, ``output_hidden_states=True`` returns all). Inputs are normalised pixel values (as from a transformers image processor) with height
and width multiples of the finest branch's patch size. Its ``_init_weights`` is a no-op: the
parent model's ``post_init`` leaves PIIP's own initialisation (and loaded branch weights) alone.
piip's own segmentor is :func:`piip.tasks.segmentation.build_segmentor` (dropout, padding,
normalisation and slide inference included).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from transformers import AutoBackbone, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin   # transformers >= 5
from transformers.modeling_outputs import BackboneOutput

from ..backbone import PIIPBackbone
from ..config import PIIPConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]
# The model type names the import that registers it: a folder loaded without it (e.g. a saved UperNet,
# whose backbone config transformers resolves by this key) fails with one line that says what to do.
MODEL_TYPE = "piip (load it after: import piip.integrations.transformers)"
LEGACY_MODEL_TYPE = "piip"   # folders saved by earlier piip versions


class PIIPHFConfig(BackboneConfigMixin, PretrainedConfig):
    """``piip_config`` is a :class:`piip.PIIPConfig` dict; ``out_features`` / ``out_indices`` pick pyramid
    levels ``stage1..stage4`` (strides 4/8/16/32), all four by default."""

    model_type = MODEL_TYPE

    def __init__(self, piip_config: Optional[dict[str, Any]] = None, out_features: Optional[list[str]] = None,
                 out_indices: Optional[list[int]] = None, **kwargs: Any) -> None:
        if "stem" in (kwargs.pop("stage_names", None) or []) and out_features is None and out_indices is not None:
            out_indices = [i - 1 for i in out_indices if i > 0]   # earlier versions listed an unused 'stem'
        super().__init__(**kwargs)
        self.piip_config = piip_config
        self.stage_names = list(STAGES)
        if out_features is None and out_indices is None:
            out_indices = list(range(len(STAGES)))
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)


class _LegacyPIIPHFConfig(PIIPHFConfig):
    model_type = LEGACY_MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:   # transformers wraps configs without their own __init__
        super().__init__(**kwargs)


class PIIPHFBackbone(BackboneMixin, PreTrainedModel):
    """PIIP's pyramid as a transformers backbone: ``feature_maps`` are the ``out_features`` levels,
    ``hidden_states`` (when asked) all four levels."""

    config_class = PIIPHFConfig
    main_input_name = "pixel_values"
    has_attentions = False

    def __init__(self, config: PIIPHFConfig) -> None:
        super().__init__(config)
        if not config.piip_config:
            raise ValueError("PIIPHFConfig needs piip_config (use piip_backbone_config(name_or_config))")
        self.piip = PIIPBackbone(PIIPConfig.from_dict(config.piip_config))
        if len(self.piip.out_channels) != len(STAGES) or (self.piip.cfg.pyramid_levels or [0, 1, 2, 3]) != [0, 1, 2, 3]:
            raise ValueError("the PIIP model has no 4-level pyramid (pyramid=None or pyramid_levels set); use a dense "
                             "model with all four levels and pick them with out_features / out_indices")
        self.num_features = list(self.piip.out_channels)
        self.post_init()

    def _init_weights(self, module: Any) -> None:  # PIIP initialises itself
        return

    def forward(self, pixel_values, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs: Any):
        if output_attentions:
            raise ValueError("a PIIP backbone has no attention maps to return (output_attentions=True)")
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        maps = tuple(self.piip(pixel_values).values())
        feats = tuple(maps[STAGES.index(name)] for name in self.out_features)
        if not return_dict:
            return (feats, maps) if hidden else (feats,)
        return BackboneOutput(feature_maps=feats, hidden_states=maps if hidden else None, attentions=None)


def piip_backbone_config(model: Union[str, PIIPConfig], out_features: Optional[list[str]] = None,
                         out_indices: Optional[list[int]] = None, **overrides: Any) -> PIIPHFConfig:
    """A transformers backbone config for a registered PIIP name or a :class:`PIIPConfig`
    (``overrides`` as in :func:`piip.get_config`; ``out_features`` / ``out_indices`` as every
    transformers backbone)."""
    if isinstance(model, str):
        from ..registry import get_config
        cfg = get_config(model, **overrides)
    else:
        cfg = model.replace(**overrides) if overrides else model
    if cfg.task != "dense":
        raise ValueError(f"a transformers backbone needs a dense PIIP config, got task={cfg.task!r}")
    return PIIPHFConfig(piip_config=cfg.to_dict(), out_features=out_features, out_indices=out_indices)


class _LegacyPIIPHFBackbone(PIIPHFBackbone):
    config_class = _LegacyPIIPHFConfig


for _cfg, _model in ((PIIPHFConfig, PIIPHFBackbone), (_LegacyPIIPHFConfig, _LegacyPIIPHFBackbone)):
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoBackbone.register(_cfg, _model, exist_ok=True)
