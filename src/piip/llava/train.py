"""PIIP-LLaVA training (llava_spec §4) on piip's one engine (:class:`piip.engine.Trainer`: DDP under
``torchrun``, bf16 autocast on GPU, atomic checkpoints, exact resume).

Stage 1 (``pretrain``): only the projector trains (lr 1e-3), ``plain`` template, square images.
Stage 2 (``finetune``): LLM + projector + the whole tower (lr 2e-5), ``vicuna_v1``, padded images;
text-only samples get a blank image so every parameter stays in the graph. Both: AdamW, weight
decay 0, cosine with 3% warm-up, LLM gradient checkpointing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine.sampler import ResumableSampler
from .processing import IMAGE, LlavaCollator, PiipLlavaProcessor

STAGES = {"pretrain": {"lr": 1e-3, "template": "plain", "pad": False},
          "finetune": {"lr": 2e-5, "template": "vicuna_v1", "pad": True}}
UNFREEZE = ("all", "interactions", "none")


class LlavaJsonDataset(Dataset):
    """LLaVA-format JSON (a list of ``{"image": rel_path?, "conversations": [{"from", "value"}, ...]}``)
    + an image folder -> tokenized samples (``input_ids``, ``labels``, ``pixel_values`` or None)."""

    def __init__(self, json_path: str, image_folder: Optional[str], processor: PiipLlavaProcessor,
                 template: str, pad: bool) -> None:
        self.rows = read_llava_json(json_path, image_folder, template)
        self.folder, self.processor, self.template = image_folder, processor, template
        self.image_processor = type(processor.image_processor)(**{**processor.image_processor.to_dict(), "pad": pad})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image
        row = self.rows[i]
        turns = row["conversations"]
        pix = None
        if row.get("image") is not None:
            if self.folder is None:
                raise ValueError("samples have images: give --image-folder")
            path = os.path.join(self.folder, row["image"])
            try:
                with Image.open(path) as im:
                    pix = self.image_processor.preprocess_one(im)
            except (OSError, SyntaxError) as e:   # damaged after the start-up check: one line naming it
                raise ValueError(f"sample {i}: image {path!r} cannot be read ({type(e).__name__}: {e})") from None
            if self.template == "plain":  # stage 1: the image token alone, then the caption
                turns = [{"from": "human", "value": IMAGE}, turns[1]]
        ids, labels = self.processor.encode_conversation(turns, self.template)
        return {"input_ids": ids, "labels": labels, "pixel_values": pix}


def read_llava_json(json_path: str, image_folder: Optional[str], template: str) -> list[dict[str, Any]]:
    """The samples of a LLaVA-format JSON, checked before anything is built: a list of objects with a
    ``conversations`` list, and every ``image`` a non-empty file under ``image_folder`` (the first
    offender and the count are named). ``template='plain'`` (stage 1) needs an image in every sample."""
    if os.path.isdir(json_path) or not os.path.isfile(json_path):
        raise FileNotFoundError(f"--data {json_path!r}: no such JSON file (a LLaVA-format list of samples)")
    try:
        with open(json_path, encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {json_path!r} is not valid JSON ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{json_path}: expected a non-empty JSON list of LLaVA samples")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
            raise ValueError(f"{json_path}: sample {i} has no 'conversations' list (each sample: {{\"image\": "
                             "optional path, \"conversations\": [{\"from\": \"human\", \"value\": ...}, ...]})")
    with_image = [i for i, r in enumerate(rows) if r.get("image") is not None]
    if template == "plain" and len(with_image) < len(rows):
        bad = next(i for i, r in enumerate(rows) if r.get("image") is None)
        raise ValueError(f"{json_path}: sample {bad} ({len(rows) - len(with_image)} in all) has no image; stage 1 "
                         "(the 'plain' template) trains on image-caption pairs only")
    if with_image and image_folder is None:
        raise ValueError(f"{json_path}: {len(with_image)} sample(s) have images: give --image-folder")
    if with_image and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder!r} is not a folder")
    problems = []
    for i in with_image:
        path = os.path.join(image_folder, str(rows[i]["image"]))
        if os.path.isdir(path):
            problems.append(f"sample {i}: image {path!r} is a folder, not an image file")
        elif not os.path.isfile(path):
            problems.append(f"sample {i}: image {path!r} does not exist")
        elif os.path.getsize(path) == 0:
            problems.append(f"sample {i}: image {path!r} is empty (0 bytes)")
    if problems:
        raise ValueError(f"{json_path}: {problems[0]}" + (f" ({len(problems)} unusable images in all)"
                                                          if len(problems) > 1 else ""))
    return rows


def modality_lengths(rows: list[dict[str, Any]]) -> list[int]:
    """Words per sample, negative for text-only ones (the official ``modality_lengths``)."""
    out = []
    for r in rows:
        n = sum(len(str(t.get("value", "")).split()) for t in r["conversations"])
        out.append(n if r.get("image") is not None else -n)
    return out


class ModalityGroupedSampler(ResumableSampler):
    """Stage 2's sampler (the official ``group_by_modality_length``): megabatches of ``world x batch``
    samples hold one modality (image or text-only) and are sorted by length inside, their order is
    shuffled per epoch, and the leftover samples of both modalities form the last megabatch. Every
    rank's batch therefore comes from one megabatch: one modality, similar lengths. Resumable and
    rank-sharded as :class:`piip.engine.ResumableSampler`, which splits the global order round robin."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(len(lengths), True, seed, rank, world_size)
        self.lengths, self.mega = list(lengths), batch_size * world_size

    def global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        megas, rest = [], []
        for group in ([i for i, n in enumerate(self.lengths) if n > 0], [i for i, n in enumerate(self.lengths) if n <= 0]):
            perm = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
            full = len(perm) // self.mega * self.mega
            megas += [sorted(perm[k:k + self.mega], key=lambda i: -abs(self.lengths[i]))
                      for k in range(0, full, self.mega)]
            rest += perm[full:]
        megas = [megas[j] for j in torch.randperm(len(megas), generator=g).tolist()]
        return [i for m in megas for i in m] + rest


def set_trainable(model: nn.Module, stage: str, unfreeze_vision: str = "all") -> None:
    """Stage 1: the projector only. Stage 2: LLM + projector + the tower (``unfreeze_vision``: 'all',
    'interactions' only, or 'none')."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    if unfreeze_vision not in UNFREEZE:
        raise ValueError(f"unfreeze_vision must be one of {UNFREEZE}, got {unfreeze_vision!r}")
    model.requires_grad_(stage == "finetune")
    model.multi_modal_projector.requires_grad_(True)
    if stage == "finetune" and unfreeze_vision != "all":
        model.vision_tower.requires_grad_(False)
        if unfreeze_vision == "interactions" and model.vision_tower.interactions is not None:
            model.vision_tower.interactions.requires_grad_(True)


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {"loss": model(**batch).loss}


@dataclass
class LlavaTrainArgs:
    stage: str
    data: str
    image_folder: Optional[str]
    out: str
    lr: Optional[float] = None
    epochs: int = 1
    batch_size: int = 16
    accum_steps: int = 1
    max_steps: Optional[int] = None
    workers: int = 2
    unfreeze_vision: str = "all"
    gradient_checkpointing: bool = True
    group_by_modality: bool = True   # stage 2: ModalityGroupedSampler
    device: str = "auto"
    seed: int = 0
    log_every: int = 10


def build_trainer(model: nn.Module, processor: PiipLlavaProcessor, a: LlavaTrainArgs) -> Any:
    """The engine's Trainer for one stage (the stage's trainable set, template and lr)."""
    from ..engine import TrainConfig, Trainer
    st = STAGES[a.stage]
    set_trainable(model, a.stage, a.unfreeze_vision)
    if a.stage == "pretrain" and _on_cuda(a.device):  # frozen LLM, tower and head held in bf16 (fp32 projector)
        for m in (model.language_model, model.vision_tower, model.lm_head):
            m.to(torch.bfloat16)
    if a.gradient_checkpointing:
        lm = model.language_model   # transformers >= 5 renamed the method
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
        if a.stage == "pretrain":  # frozen LLM: checkpointed blocks still need inputs that carry gradients
            model.enable_input_require_grads()
    ds = LlavaJsonDataset(a.data, a.image_folder, processor, st["template"], st["pad"])
    cfg = TrainConfig(output_dir=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr or st["lr"],
                      weight_decay=0.0, schedule="cosine", warmup_epochs=0.03 * a.epochs, warmup_ratio=0.0,
                      accum_steps=a.accum_steps, max_steps=a.max_steps, workers=a.workers, device=a.device,
                      seed=a.seed, log_every=a.log_every, lr_steps=[])
    collate = LlavaCollator(processor.tokenizer.pad_token_id, processor.image_processor.blank(),
                            processor.ignore_index)
    trainer = Trainer(model, ds, cfg, forward_loss, collate_fn=collate,
                      extra_state={"llava_stage": a.stage, "config": model.config.to_dict()})
    if a.stage == "finetune" and a.group_by_modality:
        trainer.sampler = ModalityGroupedSampler(modality_lengths(ds.rows), a.batch_size, a.seed, trainer.rank,
                                                 trainer.world)
    return trainer


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def save_stage(model: nn.Module, processor: PiipLlavaProcessor, stage: str, out: str) -> str:
    """Stage 1 writes the projector only (``mm_projector.safetensors``); stage 2 the whole HF folder."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    if stage == "pretrain":
        sd = {f"multi_modal_projector.{k}": v.detach().contiguous().cpu()
              for k, v in model.multi_modal_projector.state_dict().items()}
        path = os.path.join(out, "mm_projector.safetensors")
        save_file(sd, path, metadata={"format": "pt"})
        model.config.save_pretrained(out)
        return path
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_projector(model: nn.Module, path: str) -> None:
    """Load a stage-1 ``mm_projector.safetensors`` (or an official ``mm_projector.bin``) strictly."""
    from ..weights.io import read_state_dict
    from ..weights.llava import llm_and_projector_from_official
    sd = read_state_dict(path)
    if any(k.startswith("model.mm_projector.") for k in sd):
        sd = {llm_and_projector_from_official(k)[len("model."):]: v for k, v in sd.items()}
    own = {k[len("multi_modal_projector."):]: v for k, v in sd.items() if k.startswith("multi_modal_projector.")}
    if len(own) != len(sd):
        raise ValueError(f"{path}: expected only projector tensors, found {sorted(set(sd) - set(own))[:5]}")
    from ..weights.io import strict_load
    strict_load(model.multi_modal_projector, own, path)
