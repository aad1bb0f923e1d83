"""timm's ``pretrained_cfg`` of a piip model (input size, mean / std, crop, released file), as a
function and as the mixin the models carry. Imports neither timm nor the registry: the models
themselves (:mod:`piip.backbone`, :mod:`piip.tasks.classification`) inherit the mixin."""
from __future__ import annotations

from typing import Any, Optional

from ..config import IMAGE_NORMS, IMAGENET, PIIPConfig


def pretrained_cfg(name: Optional[str], cfg: PIIPConfig) -> dict[str, Any]:
    """timm's data / head description of model ``name`` built with ``cfg``: input size, mean / std
    (what piip feeds it: ImageNet statistics for classifiers, the config's ``image_norm`` otherwise),
    crop (none: the whole image), and the released weights' Hub file."""
    from ..weights.hub import REPO, released_file
    side = int(round(cfg.img_size))
    cls = cfg.task == "classification"
    mean, std = IMAGENET if cls else IMAGE_NORMS[cfg.image_norm]
    filename = released_file(name) if name else None
    out = {"architecture": name, "input_size": (3, side, side), "fixed_input_size": False,
           "interpolation": "bicubic" if cls else "bilinear", "crop_pct": 1.0, "crop_mode": "center",
           "mean": mean, "std": std, "num_classes": cfg.num_classes if cls else 0,
           "first_conv": "branches.0.patch_embed.proj" if not cls else "backbone.branches.0.patch_embed.proj",
           "classifier": "heads" if cls else None, "license": "mit", "paper_ids": "arXiv:2406.04330"}
    if filename is not None:
        out.update(hf_hub_id=REPO, hf_hub_filename=filename,
                   url=f"https://huggingface.co/{REPO}/resolve/main/{filename}")
    return out


class PretrainedCfgMixin:
    """timm's ``pretrained_cfg`` / ``default_cfg``: the one :func:`piip.create_model` set (with the
    model's name and released file), else derived from the model's own config, so that
    ``timm.data.resolve_model_data_config`` answers the real input size of any piip model (loaded
    with ``from_pretrained``, built from a config...)."""

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.__dict__.get("_pretrained_cfg") or pretrained_cfg(None, self.cfg)  # type: ignore[attr-defined]

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict[str, Any]) -> None:
        self.__dict__["_pretrained_cfg"] = dict(value)

    default_cfg = pretrained_cfg
