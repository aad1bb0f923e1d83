import pytest
import torch

import piip


def tiny_overrides(name: str, img_size: int = 64) -> dict:
    """Overrides that keep a registered model's structure (branch count, depths, groups, windows)
    but shrink widths and resolution so that it runs in milliseconds."""
    cfg = piip.get_config(name)
    n = len(cfg.branches)
    branches = [{"embed_dim": 32 * (i + 1), "num_heads": 2} for i in range(n)]
    return dict(img_size=img_size, branches=branches, deform_num_heads=2, num_classes=7)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
