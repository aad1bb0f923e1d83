import json
import os

import pytest
import torch

import piip

# pytest-xdist (`-n auto`, the README's command): each worker gets its share of the cores, so two
# workers on two cores do not oversubscribe them with two intra-op thread pools each
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``heavy`` (Inductor, ONNX exports, multi-process runs: 10 s to 3 min each on 2
    cores) are collected first. With ``-n auto --maxschedchunk 1`` (the README's command) xdist hands
    them out one at a time, so they spread over the workers and the light tests fill in behind them,
    instead of one worker getting every heavy test in its first chunk."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)   # stable: order kept otherwise


def made_coco(tmp_path_factory, name: str, **kwargs) -> tuple[str, str, dict]:
    """A generated COCO folder (``piip.data.synthetic.make_coco(**kwargs)``): root, annotation file, its JSON."""
    from piip.data.synthetic import make_coco
    root = str(tmp_path_factory.mktemp(name))
    ann = make_coco(root, **kwargs)
    with open(ann) as f:
        return root, ann, json.load(f)


def tiny_overrides(name: str, img_size: int = 64) -> dict:
    """Overrides that keep a registered model's structure (branch count, depths, groups, windows)
    but shrink widths and resolution so that it runs in milliseconds."""
    cfg = piip.get_config(name)
    branches = [{"stage_dims": [32 * (i + 1)] * 2 + [64 * (i + 1)] * 2} if b.kind == "convnext"
                else {"embed_dim": 32 * (i + 1), "num_heads": 2} for i, b in enumerate(cfg.branches)]
    head = {"num_classes": 7} if cfg.task == "classification" else {}   # a backbone refuses num_classes
    return dict(img_size=img_size, branches=branches, deform_num_heads=2, **head)


def tiny_input_size(name: str) -> tuple[int, int]:
    """A small non-square input every branch of the model accepts (ConvNeXt views need >= 32 px)."""
    return (128, 96) if any(b.kind == "convnext" for b in piip.get_config(name).branches) else (64, 96)


def official_keys_dir() -> str:
    """shared/reference/official_keys in the first parent directory that has it (clones and worktrees)."""
    here = os.path.abspath(os.path.dirname(__file__))
    while here != os.path.dirname(here):
        cand = os.path.join(here, "shared", "reference", "official_keys")
        if os.path.isdir(cand):
            return cand
        here = os.path.dirname(here)
    return os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "official_keys")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def detector_step_losses(model, batch, steps: int, lr: float, clip=None) -> list:
    """Total loss of ``steps`` AdamW steps (layer decay 0.85) of a detector on one batch, with the
    same random draws (RoI sampling, denoising noise) every step so that only learning moves it."""
    from piip.engine import build_optimizer
    opt = build_optimizer(model, lr=lr, weight_decay=0.0, layer_decay=0.85)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        loss = sum(model(*batch).values())
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses
