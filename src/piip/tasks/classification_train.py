"""Loss, evaluation and checkpoint loading for training PIIP classifiers.

The recipes are ``piip.zoo.recipes.CLASSIFICATION_RECIPES`` (every value can be overridden on the
command line).

Differences from the released DeiT fork: the lr changes every iteration (the fork steps it once per
epoch), and AMP defaults to bf16 autocast without a loss scaler (the fork: fp16 + scaler, available
with ``--amp-dtype float16``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import Tensor, nn

# parameters that come from the pretrained branches (released: names starting with branchN./blocks/
# patch_embed/pos_embed/cls_token, including each branch's norm and head); everything else is new
PRETRAINED_PARAMS = r"^(backbone\.branches\.|heads\.)"
NEW_MODULES = r"^(?!backbone\.branches\.|heads\.)"
# DeiT: no weight decay on position tables and class tokens (and, as usual, on norms and biases)
NO_DECAY_NAMES = [r"pos_embed", r"cls_token", r"\.cls_pos"]


def make_loss(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.0):  # noqa: ANN201
    """``forward_fn(model, (images, labels), device) -> {'loss_cls': ...}`` for the Trainer.

    With mixup / cutmix on, a batch is mixed (timm ``Mixup``: prob 1, switch 0.5, per batch, label
    smoothing inside) and the loss is soft-target cross-entropy; otherwise label-smoothed cross-entropy.
    An odd batch (after unreadable images were dropped) loses its last image, as mixing pairs images;
    a batch of one image is not mixed (mixing it with itself would give the image back)."""
    mixer = None
    if mixup > 0 or cutmix > 0:
        from timm.data import Mixup
        mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=smoothing, num_classes=num_classes)

    def forward(model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixer is not None:
            if len(x) == 1:   # mixing an image with itself: the image and its smoothed one-hot label
                target = torch.full((1, num_classes), smoothing / num_classes, device=device)
                target[0, y[0]] += 1.0 - smoothing
            else:
                if len(x) % 2:
                    x, y = x[:-1], y[:-1]
                x, target = mixer(x, y)
            logits = model(x)
            loss = torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        return {"loss_cls": loss}

    return forward


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for every k (k capped at
    the number of classes)."""
    out = {}
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hit = top == labels[:, None]
    for k in ks:
        out[k] = int(hit[:, :min(k, maxk)].any(dim=1).sum())
    return out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, device: torch.device, batch_size: int = 64, workers: int = 2,
                        amp: Optional[bool] = None, out_path: Optional[str] = None) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%), per-class accuracy and the confusion matrix (rows = true class)
    on ``dataset`` (skipped unreadable images are counted, not scored); written as JSON to ``out_path``
    (by rank 0). Under torchrun every process scores its own 1/world of the images and the counts
    are summed, so the result equals a single process's."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from ..data.classification import classification_collate
    from ..engine.distributed import is_main, rank, world_size
    amp = device.type == "cuda" if amp is None else amp
    model.eval()
    n_cls = len(dataset.class_names)
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long, device=device)
    counts = torch.zeros(4, dtype=torch.long, device=device)  # top-1, top-5, scored, skipped
    shard = Subset(dataset, list(range(rank(), len(dataset), world_size())))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=classification_collate)
    for x, y in loader:
        if len(y) == 0:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(device)).float()
        y = y.to(device)
        hits = topk_correct(logits, y)
        counts[0] += hits[1]
        counts[1] += hits[5]
        counts[2] += len(y)
        confusion += torch.bincount(y * n_cls + logits.argmax(-1), minlength=n_cls * n_cls).view(n_cls, n_cls)
    counts[3] = len(shard) - counts[2]  # unreadable images are dropped by the collate (workers keep own logs)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(counts)
    confusion, counts = confusion.cpu(), counts.tolist()
    correct, total = {1: counts[0], 5: counts[1]}, counts[2]
    per_class = {}
    for i, name in enumerate(dataset.class_names):
        n = int(confusion[i].sum())
        per_class[name] = round(100.0 * int(confusion[i, i]) / n, 4) if n else None
    result = {"top1": 100.0 * correct[1] / max(total, 1), "top5": 100.0 * correct[5] / max(total, 1),
              "images": total, "skipped": counts[3],
              "per_class": per_class, "confusion": confusion.tolist(), "class_names": list(dataset.class_names)}
    if out_path and is_main():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def classifier_config_dict(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_classifier` needs to rebuild ``model`` (stored in checkpoints)."""
    return {"task": "classification", "backbone": model.cfg.to_dict()}


def classifier_from_config(d: dict[str, Any]) -> nn.Module:
    """Rebuild a classifier (random weights) from :func:`classifier_config_dict`'s output."""
    from ..config import PIIPConfig
    from ..registry import build_from_config
    return build_from_config(PIIPConfig.from_dict(d["backbone"]))


def load_classifier(path: str, model: Optional[str] = None, overrides: Optional[dict[str, Any]] = None,
                    use_ema: bool = False, map_location: str = "cpu") -> tuple[nn.Module, Optional[list[str]]]:
    """``(classifier, class names or None)`` from a piip classification training checkpoint (rebuilt
    from the config inside it; ``use_ema`` takes its EMA weights) or, with ``model``, from an
    official / piip weights file (``create_model(model, checkpoint=path)``)."""
    from ..registry import create_model
    from ..weights.io import read_checkpoint
    from .registry import rebuild_trained
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt: Any = read_checkpoint(path, weights_only=True, map_location=map_location)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        if use_ema and "model_ema" not in ckpt and ckpt["model_config"].get("task") == "classification":
            raise ValueError(f"{path} has no EMA weights (trained without EMA)")
        net = rebuild_trained(path, ckpt, "classification", "classifier", "model_ema" if use_ema else "model")
        return net, ckpt.get("class_names")
    if model is None:
        raise ValueError(f"{path} holds no model config; pass the model name (--model) it belongs to")
    if use_ema:
        raise ValueError("--ema needs a piip classification training checkpoint")
    return create_model(model, checkpoint=path, **(overrides or {})), None


def classifier_from_checkpoint(path: str) -> nn.Module:
    """The classifier of a ``piip train classification`` checkpoint (:func:`load_classifier` without
    its class names: the task table's loader)."""
    return load_classifier(path)[0]


def classify(model: nn.Module, image: Tensor, crop_ratio: float = 1.0) -> Tensor:
    """Class probabilities (K,) of one uint8 (3, H, W) RGB image under the evaluation transform."""
    from PIL import Image

    from ..data.classification import build_transforms
    x = build_transforms(int(model.cfg.img_size), False, crop_ratio=crop_ratio)(
        Image.fromarray(image.permute(1, 2, 0).numpy()))
    with torch.no_grad():
        return model(x[None].to(next(model.parameters()).device)).float().softmax(-1)[0].cpu()


def predict_topk(image: str, checkpoint: str, k: int = 5, device: str = "cpu", crop_ratio: float = 1.0) -> list:
    """``[(class name, probability)]`` of the ``k`` most likely classes of one image file."""
    from ..data.images import read_rgb
    img = read_rgb(image)
    model, names = load_classifier(checkpoint)
    prob = classify(model.eval().to(device), img, crop_ratio)
    top = prob.topk(min(k, len(prob)))
    names = names or [str(i) for i in range(len(prob))]
    return [(names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
