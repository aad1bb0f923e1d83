"""Training augmentation on current Pillow: every timm op of the released policies at every magnitude,
with and without magnitude noise, on odd-sized uint8 images, through piip's guarded transforms."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

aa = pytest.importorskip("timm.data.auto_augment")
from PIL import Image  # noqa: E402

from piip.data.augment import AugmentationError, GuardedOp, guard_augment_ops  # noqa: E402
from piip.data.classification import build_transforms  # noqa: E402

SIZES = [(1, 1), (3, 5), (17, 13), (63, 64)]
# what timm's create_transform passes to the ops of a 64-px RandAugment
HPARAMS = dict(translate_const=int(64 * 0.45), img_mean=(124, 116, 104))


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def guarded(name: str, magnitude: float, **hp) -> "aa.AugmentOp":
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams={**HPARAMS, **hp})
    return guard_augment_ops(op)


@pytest.mark.parametrize("mstd", [0.0, 0.5, float("inf")])
def test_every_op_at_every_magnitude(mstd):
    imgs = images()
    for name in aa.NAME_TO_OP:
        for m in range(11):
            op = guarded(name, m, magnitude_std=mstd)
            for img in imgs:
                for _ in range(2 if mstd else 1):
                    out = op(img)
                    assert out.size == img.size and out.mode == "RGB", (name, m)


@pytest.mark.parametrize("draw", [-1e3, 1e3])
def test_noise_extremes_and_a_raised_magnitude_cap(draw, monkeypatch):
    """Whatever the gaussian noise draws (timm clamps to [0, mmax]); with mmax=30 the levels leave
    the op's table range, Posterize* bits go negative or above 8, and still nothing is refused."""
    monkeypatch.setattr(random, "gauss", lambda mu, sigma: draw)
    imgs = images()
    for name in aa.NAME_TO_OP:
        for mmax in (None, 30):
            op = guarded(name, 9, magnitude_std=0.5, **({"magnitude_max": mmax} if mmax else {}))
            for img in imgs:
                assert op(img).size == img.size


def test_posterize_zero_bits_is_pillow_12s_black_image_and_other_levels_are_unchanged():
    img = images()[3]
    # PosterizeIncreasing: magnitude 10 -> 0 bits (Pillow 13 refuses it unguarded)
    raw = aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams=HPARAMS)
    with pytest.raises(ValueError):
        raw(img)
    assert not np.asarray(guarded("PosterizeIncreasing", 10)(img)).any()
    refused = []
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize", "Rotate", "ColorIncreasing"):
        for m in range(11):
            random.seed(m)
            b = np.asarray(guarded(name, m)(img))
            random.seed(m)
            try:
                a = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=m, hparams=HPARAMS)(img))
            except ValueError:   # 0 bits: black, as Pillow <= 12 made it
                refused.append((name, m))
                assert not b.any()
                continue
            assert np.array_equal(a, b), (name, m)      # in range: exactly timm's result
    assert refused == [("Posterize", 0), ("Posterize", 1), ("Posterize", 2), ("PosterizeIncreasing", 10)]


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "original", "v0", "3a",
                                    "augmix-m5-w3"])
def test_released_and_other_policies_through_build_transforms(policy):
    tf = build_transforms(32, True, policy)
    ops = [op for op in _all_ops(tf)]
    assert ops and all(isinstance(op.aug_fn, GuardedOp) for op in ops)
    random.seed(0)
    torch.manual_seed(0)
    for i in range(40):
        img = images()[i % len(SIZES)]
        x = tf(img)
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_the_released_policy_draws_zero_bits_and_survives(monkeypatch):
    """rand-m9-mstd0.5-inc1 reaches PosterizeIncreasing at magnitude >= 10 (0 bits) within a few
    hundred draws: the crash of the issue, now a black image; Pillow only ever sees 1..8 bits."""
    from PIL import ImageOps
    seen = []
    real = ImageOps.posterize
    monkeypatch.setattr(ImageOps, "posterize", lambda img, bits: seen.append(bits) or real(img, bits))
    tf = build_transforms(16, True, "rand-m9-mstd0.5-inc1")
    post = [op for op in _all_ops(tf) if op.name == "PosterizeIncreasing"][0]
    random.seed(0)
    img = images()[2]
    black = sum(not np.asarray(post(img)).any() for _ in range(600))
    assert black > 0 and seen and set(seen) <= set(range(1, 9))


def test_a_failing_op_is_named():
    op = aa.AugmentOp("Rotate", prob=1.0, magnitude=5, hparams=HPARAMS)
    guard_augment_ops(op)

    def boom(img, *a, **k):
        raise OSError("broken op")
    op.aug_fn.fn = boom
    with pytest.raises(AugmentationError, match=r"augmentation op Rotate\(.*\) failed on a 17x13 RGB image: "
                                                r"OSError: broken op"):
        op(images()[2])


def test_an_unknown_policy_is_one_line():
    with pytest.raises(ValueError, match="--auto-augment 'foo'"):
        build_transforms(32, True, "foo")


def _all_ops(tf):
    from piip.data.augment import _ops
    return _ops(tf)
