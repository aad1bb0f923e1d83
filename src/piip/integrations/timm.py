"""Every piip model name in timm's registry: ``timm.create_model("piip_tsb_1120_896_448", ...)``.

``import piip`` does not import timm (it doubles the import time): the names are registered the
moment timm is imported, before or after piip (a post-import hook on the ``timm`` module), with
timm's own ``register_model`` / ``generate_default_cfgs``. Each entry point is
:func:`piip.create_model`, so ``pretrained``, ``features_only``, ``out_indices``, ``num_classes``,
``img_size`` and any config override behave as there; ``pretrained_cfg`` carries the model's real
input size, mean / std, crop and the Hub location of its released weights, which is what
``timm.data.resolve_model_data_config`` reads.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any, Callable, Optional

from ..config import PIIPConfig
from ..data.transforms import IMAGE_NORMS, IMAGENET

# timm's generic options piip has no equivalent for, and the value that means "not used"
_NEUTRAL = {"in_chans": 3, "drop_rate": 0.0, "global_pool": None}
default_cfgs: dict[str, Any] = {}   # read by timm's register_model (module attribute by that name)
_registered = False


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


def _entrypoint(name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Optional[str] = None, **kwargs: Any) -> Any:
        from ..registry import create_model
        for key, neutral in _NEUTRAL.items():
            if key in kwargs and kwargs[key] != neutral:
                raise ValueError(f"{key}={kwargs[key]!r}: piip models do not take this timm option")
            kwargs.pop(key, None)
        if "drop_path_rate" in kwargs:    # timm's name for the stochastic-depth rate of every branch
            kwargs["branches"] = {**kwargs.get("branches", {}), "drop_path": kwargs.pop("drop_path_rate")}
        for key in ("feature_cls", "output_stride", "flatten_sequential"):
            if kwargs.get(key) not in (None, "getter", 32, True, False):
                raise ValueError(f"{key}={kwargs[key]!r}: piip feature models take features_only / out_indices only")
            kwargs.pop(key, None)
        return create_model(name, pretrained=bool(pretrained), cache_dir=cache_dir, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"piip model {name} (see piip.describe_model)."
    return create


def register(name: str) -> None:
    """Put ``name`` in timm's registry (timm must be imported)."""
    from timm.models import generate_default_cfgs, register_model

    from ..registry import get_config
    default_cfgs.update(generate_default_cfgs({name: pretrained_cfg(name, get_config(name))}))
    register_model(_entrypoint(name))


def register_all() -> None:
    global _registered
    from ..registry import list_models
    for name in list_models():
        register(name)
    _registered = True


def on_register(name: str) -> None:
    """Called by :func:`piip.register_model`: names registered later reach timm too."""
    if _registered:
        register(name)


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds ``timm`` with the normal machinery and runs :func:`register_all` once it has loaded.

    It stays in ``sys.meta_path`` until timm is really executed: availability probes such as
    ``importlib.util.find_spec("timm")`` (transformers runs one on import) also come here, and
    removing the hook at the first lookup would leave the later real import unregistered."""

    _busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("timm")   # the other finders (this one answers None while busy)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module
        hook = self

        def exec_module(module: Any) -> None:
            loader_exec(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            _safe_register_all()

        spec.loader.exec_module = exec_module   # type: ignore[method-assign]
        return spec


def _safe_register_all() -> None:
    try:
        register_all()
    except Exception as e:  # noqa: BLE001 - a failure here must not break `import timm`
        warnings.warn(f"piip could not register its models with timm: {e}", stacklevel=2)


def install() -> None:
    """Register now if timm is loaded, else as soon as it is (called by ``import piip``)."""
    from ..registry import add_register_hook
    add_register_hook(on_register)
    if "timm" in sys.modules:
        _safe_register_all()
    elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimmImport())
