"""Released PIIP-LLaVA folders (``OpenGVLab/PIIP-LLaVA_*``: sharded safetensors + a LLaVA-fork
``config.json``) -> native piip.llava folders that ``from_pretrained`` loads (llava_spec §7.4).

The variant is recognised from the weights (ConvNeXt or CLIP fine branch, ConvNeXt width, CLIP-L
position count, interaction count), never from the folder name. LLM and projector tensors are
renamed shard by shard (memory stays at one shard plus the vision tower); the tower, whose CLIP
q/k/v and class positions must be fused, is gathered across shards. Every key is accounted for:
unknown, missing or mis-shaped tensors raise with their names.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import PIIPConfig
from ..weights.llava import (TOWER, llm_and_projector_from_official, official_interaction_count,
                             tower_from_official)
from ..zoo.llava import LLAVA_TOWERS, llava_tower, tower_interactions
from .configuration import PiipLlavaConfig

# the released config.json's LLaVA-only fields (everything else is the Llama config)
_LLAVA_FIELDS = ("mm_", "image_aspect_ratio", "tokenizer_", "tune_mm", "freeze_mm", "use_mm", "unfreeze_mm",
                 "architectures", "_name_or_path", "model_type", "transformers_version", "torch_dtype", "dtype",
                 "image_grid_pinpoints", "s2", "pretraining_tp")


def _shards(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors(.index.json); expected a released PIIP-LLaVA folder "
                     "(sharded safetensors + config.json)")


def _shapes(shards: list[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
    out = {}
    for s in shards:
        with safe_open(s, "pt") as f:
            for k in f.keys():
                out[k] = tuple(f.get_slice(k).get_shape())
    return out


def detect_variant(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> tuple[str, int]:
    """(official tower variant, interaction count) from key names and shapes."""
    b2 = TOWER + "branch2."
    pos = shapes.get(TOWER + "branch1.clip_model.embeddings.position_embedding.weight")
    if pos is None:
        raise ValueError(f"{source}: no CLIP-L branch ('{TOWER}branch1.clip_model.*'); not a PIIP-LLaVA checkpoint")
    lo = {197: 224, 442: 336}.get(pos[0])
    if lo is None:
        raise ValueError(f"{source}: CLIP-L position table has {pos[0]} rows; released towers have 197 (224) or 442 "
                         "(336)")
    stem = shapes.get(b2 + "convnext_model.stem.0.weight")
    fine = "clip_b" if stem is None else {128: "convnext_b", 192: "convnext_l"}.get(stem[0], f"convnext_{stem[0]}")
    n = official_interaction_count(shapes)
    for name, (f, hi, lo_px, grid, counts) in LLAVA_TOWERS.items():
        if f == fine and grid == {224: 14, 336: 21}[lo]:
            if n not in counts:
                raise ValueError(f"{source}: {name} has {n} interactions; released ones have "
                                 f"{' or '.join(map(str, counts))}")
            return name, n
    raise ValueError(f"{source}: no released PIIP-LLaVA tower has a {fine} fine branch with a CLIP-L position table of "
                     f"{pos[0]} rows; pass the tower config explicitly")


def _text_config(official: dict[str, Any]) -> Any:
    from transformers import LlamaConfig
    d = {k: v for k, v in official.items() if not k.startswith(_LLAVA_FIELDS)}
    return LlamaConfig(**d)


def _meta_model(config: PiipLlavaConfig) -> Any:
    from .modeling import PiipLlavaForConditionalGeneration
    with torch.device("meta"):
        return PiipLlavaForConditionalGeneration(config)


def convert_official(src: str, out: str, variant: Optional[str] = None, tower: Optional[PIIPConfig] = None) -> str:
    """Write a native piip.llava folder for the official folder ``src``; returns ``out``.

    ``variant`` (a :data:`piip.zoo.llava.LLAVA_TOWERS` name) must agree with the weights; ``tower``
    gives a tower config directly (custom or tiny towers)."""
    from safetensors import safe_open
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{src}: no config.json; expected a released PIIP-LLaVA folder")
    with open(cfg_path) as f:
        official = json.load(f)
    shards = _shards(src)
    shapes = _shapes(shards)
    n = official_interaction_count(shapes)
    if tower is None:
        found, n = detect_variant(shapes, src)
        if variant is not None and variant != found:
            raise ValueError(f"{src}: the weights are a {found} tower ({n} interactions), not {variant}")
        variant, tower = found, llava_tower(found, n)
    elif tower_interactions(tower) != n:
        raise ValueError(f"{src}: the checkpoint has {n} interactions, the given tower {tower_interactions(tower)}")
    config = PiipLlavaConfig(vision_config=tower.to_dict(), text_config=_text_config(official),
                             image_aspect_ratio=official.get("image_aspect_ratio", "pad") if official.get(
                                 "image_aspect_ratio", "pad") in ("pad", "square") else "pad",
                             model_max_length=int(official.get("tokenizer_model_max_length") or 2048),
                             official_variant=os.path.basename(str(official.get("mm_vision_tower", variant or ""))))
    model = _meta_model(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    written: dict[str, str] = {}
    tower_sd: dict[str, Tensor] = {}
    for shard in shards:  # the tower first: a wrong variant shows in its branches
        with safe_open(shard, "pt") as f:
            tower_sd.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(TOWER)})
    tower_part = tower_from_official(tower_sd, model.model.vision_tower, src)
    del tower_sd
    try:
        _save(tower_part, out, f"model-{len(shards) + 1:05d}-of-{len(shards) + 1:05d}.safetensors", written, want,
              src)
        for i, shard in enumerate(shards):
            part: dict[str, Tensor] = {}
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    new = llm_and_projector_from_official(k)
                    if new is not None:
                        part[new] = f.get_tensor(k)
            _save(part, out, f"model-{i + 1:05d}-of-{len(shards) + 1:05d}.safetensors", written, want, src)
        missing = sorted(set(want) - set(written))
        if missing:
            raise ValueError(f"{src}: {len(missing)} tensors of the {variant or 'given'} model are missing, e.g. "
                             f"{missing[:5]}")
    except BaseException:
        for name in set(written.values()):
            os.remove(os.path.join(out, name))
        raise
    sizes = {k: want[k] for k in written}
    total = sum(int(torch.tensor(s).prod()) if s else 1 for s in sizes.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(written.items()))}, f, indent=1)
    config.save_pretrained(out)
    _greedy_generation_config(config, official).save_pretrained(out)
    _copy_processor(src, out, config)
    return out


def _save(part: dict[str, Tensor], out: str, name: str, written: dict[str, str], want: dict[str, tuple],
          src: str) -> None:
    from safetensors.torch import save_file
    unknown = sorted(k for k in part if k not in want)
    if unknown:
        raise ValueError(f"{src}: {len(unknown)} tensors have no place in the model, e.g. {unknown[:5]}")
    bad = [f"{k} {tuple(v.shape)} (model: {want[k]})" for k, v in part.items() if tuple(v.shape) != want[k]]
    if bad:
        raise ValueError(f"{src}: tensors with the wrong shape (wrong variant?): {bad[:5]}")
    save_file({k: v.contiguous() for k, v in part.items()}, os.path.join(out, name), metadata={"format": "pt"})
    written.update({k: name for k in part})


def _greedy_generation_config(config: PiipLlavaConfig, official: dict[str, Any]) -> Any:
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=512,
                            bos_token_id=official.get("bos_token_id", 1), eos_token_id=official.get("eos_token_id", 2),
                            pad_token_id=official.get("pad_token_id", 0) if official.get("pad_token_id") is not None
                            else 0)


def _copy_processor(src: str, out: str, config: PiipLlavaConfig) -> None:
    if not any(os.path.isfile(os.path.join(src, f)) for f in ("tokenizer.model", "tokenizer.json")):
        return
    from transformers import AutoTokenizer

    from .processing import PiipLlavaProcessor
    PiipLlavaProcessor.from_config(AutoTokenizer.from_pretrained(src), config).save_pretrained(out)


def from_official(path: str, variant: Optional[str] = None, dtype: Any = None, out: Optional[str] = None,
                  tower: Optional[PIIPConfig] = None) -> tuple[Any, Any]:
    """Load a released PIIP-LLaVA folder or hub id (``OpenGVLab/PIIP-LLaVA_...``): (model, processor or
    None when it ships no tokenizer).

    Converts into ``out`` (default: a temporary folder, removed after loading) and loads with
    ``from_pretrained``; ``dtype`` is passed on (e.g. ``torch.bfloat16``)."""
    from .modeling import PiipLlavaForConditionalGeneration
    from .processing import PiipLlavaProcessor
    if not os.path.isdir(path) and path.count("/") == 1 and not os.path.exists(path):   # a hub id
        from huggingface_hub import snapshot_download
        path = snapshot_download(path)
    tmp = None
    if out is None:
        tmp = out = tempfile.mkdtemp(prefix="piip_llava_")
    try:
        convert_official(path, out, variant=variant, tower=tower)
        kw = {"dtype": dtype} if dtype is not None else {}
        model = PiipLlavaForConditionalGeneration.from_pretrained(out, **kw).eval()
        has_tok = os.path.isfile(os.path.join(out, "processor_config.json"))
        processor = PiipLlavaProcessor.from_pretrained(out) if has_tok else None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, processor
