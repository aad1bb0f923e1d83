"""timm-style model registry: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .config import PIIPConfig
from .weights.official_match import set_known_configs

_REGISTRY: dict[str, Callable[[], PIIPConfig]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_REGISTER_HOOKS: list[Callable[[str], None]] = []   # e.g. the timm registry mirror


def add_register_hook(fn: Callable[[str], None]) -> None:
    """Call ``fn(name)`` for every model registered from now on."""
    if fn not in _REGISTER_HOOKS:
        _REGISTER_HOOKS.append(fn)


def register_model(name: str, description: str = "") -> Callable[[Callable[[], PIIPConfig]], Callable[[], PIIPConfig]]:
    """Decorator registering a function that returns the model's :class:`PIIPConfig`."""

    def deco(fn: Callable[[], PIIPConfig]) -> Callable[[], PIIPConfig]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        doc_lines = (fn.__doc__ or "").strip().splitlines()
        _DESCRIPTIONS[name] = description or (doc_lines[0] if doc_lines else "")
        for hook in _REGISTER_HOOKS:
            hook(name)
        return fn

    return deco


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell wildcard such as ``'piip_tsb*'``."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def describe_model(name: str) -> str:
    _check_name(name)
    return _DESCRIPTIONS[name]


def get_config(name: str, **overrides: Any) -> PIIPConfig:
    """The registered configuration with overrides applied (see :meth:`PIIPConfig.replace`)."""
    _check_name(name)
    cfg = _REGISTRY[name]()
    return cfg.replace(**overrides) if overrides else cfg


def build_from_config(cfg: PIIPConfig) -> nn.Module:
    """Instantiate the task model a config describes."""
    if cfg.task == "classification":
        from .tasks.classification import PIIPClassifier
        return PIIPClassifier(cfg)
    if cfg.task in ("dense", "features"):
        from .backbone import PIIPBackbone
        return PIIPBackbone(cfg)
    raise ValueError(f"unknown task {cfg.task!r}: expected 'dense', 'features' or 'classification'")


def build_on_meta(cfg: PIIPConfig) -> nn.Module:
    """The model of ``cfg`` on the meta device: shapes only, no memory, no initialisation cost
    (to be filled by :func:`piip.weights.lazy.materialize`, or only counted)."""
    from .weights.lazy import fast_meta_init
    with fast_meta_init():
        return build_from_config(cfg)


def from_pretrained(directory: str) -> nn.Module:
    """Rebuild the model :func:`piip.save_pretrained` wrote to ``directory`` and load its weights (strictly)."""
    from .weights.pretrained import load_pretrained
    return load_pretrained(directory, build_from_config)


# parameters are normal tensors even when built under torch.inference_mode (trainable later)
@torch.inference_mode(False)
def create_model(name: Optional[str] = None, pretrained: bool = False, features_only: bool = False,
                 out_indices: Optional[Any] = None, cache_dir: Optional[str] = None,
                 pretrained_branches: Optional[list] = None, checkpoint: Optional[str] = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model (``timm.create_model(name, ...)`` calls this too).

    Args:
        pretrained: load the checkpoint released for ``name`` from the Hugging Face Hub (cached;
            ``HF_HUB_OFFLINE=1`` reads the cache; needs ``piip[hub]``). With ``num_classes`` the
            released classifier is loaded, then given a new head.
        features_only: return timm's feature wrapper (forward gives the list of ``out_indices``
            maps of :attr:`feature_info`: pyramid levels, or per-branch maps).
        cache_dir: Hugging Face cache folder for ``pretrained``.
        pretrained_branches, checkpoint, overrides: see :func:`build_model`.
    """
    task = get_config(name).task if name is not None else None
    if "num_classes" in overrides and task not in (None, "classification"):
        raise ValueError(f"num_classes: {name} is a {task} model without a classifier; pick a '_cls' model "
                         "or put a head on its feature maps")
    new_head = None
    if pretrained:
        if checkpoint is not None or pretrained_branches is not None:
            raise ValueError("pretrained=True loads the released checkpoint: do not also pass checkpoint / "
                             "pretrained_branches")
        if name is None:
            raise ValueError("pretrained=True needs a model name (piip.list_models())")
        from .weights.hub import download
        checkpoint = download(name, cache_dir)
        new_head = overrides.pop("num_classes", None)
    model = build_model(name, pretrained_branches, checkpoint, **overrides)
    if new_head is not None and new_head != model.num_classes:
        model.reset_classifier(new_head)
    from .integrations.timm_cfg import pretrained_cfg
    model.pretrained_cfg = pretrained_cfg(name or getattr(model, "name", None), model.cfg)   # also its default_cfg
    if features_only:
        from timm.models._features import FeatureGetterNet
        n = len(model.feature_info)
        return FeatureGetterNet(model, out_indices=tuple(range(n)) if out_indices is None else out_indices,
                                prune=False)
    if out_indices is not None:
        raise ValueError("out_indices picks feature maps: pass features_only=True too")
    return model


@torch.inference_mode(False)
def build_model(name: Optional[str] = None, pretrained_branches: Optional[list] = None, checkpoint: Optional[str] = None,
                **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`; may be left out when ``checkpoint`` is a piip
            ``.safetensors`` file that carries its config (``piip convert official``, ``save_pretrained``).
        pretrained_branches: per-branch weights (paths or timm names, ``None`` to skip), finest first.
        checkpoint: an official PIIP checkpoint or a piip safetensors file to load. Without
            ``pretrained_branches`` the model is built on the meta device and each tensor is copied
            straight from the memory-mapped file into it: one copy of the weights in memory at most.
            When the file carries its config and ``name`` is left out or is the name it was made
            from, that config (overrides included) is used: no overrides need retyping.
        **overrides: config fields, e.g. ``img_size=224``, ``merge='linear'``,
            ``branches={'embed_dim': 64, 'num_heads': 2}``; applied on top of a carried config too.
    """
    cfg = _config_for(name, checkpoint, overrides)
    if pretrained_branches is None and checkpoint is None:
        return build_from_config(cfg)
    from . import weights  # loading code lives with the weights
    if pretrained_branches is None:
        from .weights.lazy import map_state_dict, releasing_file_pages
        sd = map_state_dict(checkpoint)
        if sd is not None:
            cfg = weights.fit_config_to_checkpoint(cfg, sd, checkpoint)
            model = build_on_meta(cfg)
            with releasing_file_pages(sd):
                weights.load_checkpoint(model, checkpoint, state_dict=sd, assign=True)
            return model
    sd = None
    if checkpoint is not None:  # the file may decide part of the build (TSBL finest-branch width)
        sd = weights.read_state_dict(checkpoint)
        cfg = weights.fit_config_to_checkpoint(cfg, sd, checkpoint)
    model = build_from_config(cfg)
    if pretrained_branches is not None:
        weights.load_pretrained_branches(model, pretrained_branches)
    if checkpoint is not None:
        weights.load_checkpoint(model, checkpoint, state_dict=sd)
    return model


def _config_for(name: Optional[str], checkpoint: Optional[str], overrides: dict[str, Any]) -> PIIPConfig:
    """The registered config, or the one a piip safetensors checkpoint carries (see :func:`create_model`)."""
    carried = None
    if checkpoint is not None:
        from .weights.io import carried_config
        carried = carried_config(checkpoint)
    if carried is not None and (name is None or name == carried[0]):
        cfg = PIIPConfig.from_dict(carried[1])
        return cfg.replace(**overrides) if overrides else cfg
    if name is None:
        raise ValueError("create_model needs a model name (piip.list_models()) unless checkpoint= is a piip "
                         ".safetensors file that carries its config (written by `piip convert official` or "
                         f"save_pretrained){'' if checkpoint is None else f'; {checkpoint} carries none'}")
    return get_config(name, **overrides)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (piip.list_models() lists {len(_REGISTRY)} models)")


def _registered_configs() -> Iterator[tuple[str, PIIPConfig]]:
    return ((name, get_config(name)) for name in list_models())


set_known_configs(_registered_configs)   # official-checkpoint errors name the registered models with a file's layout
