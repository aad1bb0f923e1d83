import pytest
import torch

import piip


def tiny_overrides(name: str, img_size: int = 64) -> dict:
    """Overrides that keep a registered model's structure (branch count, depths, groups, windows)
    but shrink widths and resolution so that it runs in milliseconds."""
    cfg = piip.get_config(name)
    branches = [{"stage_dims": [32 * (i + 1)] * 2 + [64 * (i + 1)] * 2} if b.kind == "convnext"
                else {"embed_dim": 32 * (i + 1), "num_heads": 2} for i, b in enumerate(cfg.branches)]
    return dict(img_size=img_size, branches=branches, deform_num_heads=2, num_classes=7)


def tiny_input_size(name: str) -> tuple[int, int]:
    """A small non-square input every branch of the model accepts (ConvNeXt views need >= 32 px)."""
    return (128, 96) if any(b.kind == "convnext" for b in piip.get_config(name).branches) else (64, 96)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
