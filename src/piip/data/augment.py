"""Guards around timm's AutoAugment / RandAugment / AugMix ops: the released policies, never an
out-of-range argument handed to Pillow, and a failing op named in the error.

timm's ``PosterizeIncreasing`` maps magnitude 10 (reached by ``mstd`` noise under the released
``rand-m9-mstd0.5-inc1``) to 0 bits, and ``Posterize`` maps magnitude 0 to 0 bits. Pillow up to 12
turned 0 bits into a black image (keep the 0 most significant bits); Pillow 13 raises instead. The
guard clamps the bits to [0, 8] and gives 0 bits its old meaning, so the policy's distribution is
the one the released models were trained with. Every op keeps timm's own implementation and
level-to-argument table; only the call is wrapped.
"""
from __future__ import annotations

from typing import Any, Callable


class AugmentationError(RuntimeError):
    """An augmentation op failed on an image (names the op, its arguments and the image)."""


def _posterize_bits(bits: Any) -> int:
    return max(0, min(8, int(bits)))


class GuardedOp:
    """Calls timm op ``fn`` (registered as ``name``) with in-range arguments; re-raises a failure as
    :class:`AugmentationError` naming the op (picklable: DataLoader workers may be spawned)."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn = name, fn

    def __call__(self, img: Any, *args: Any, **kwargs: Any) -> Any:
        from timm.data import auto_augment as aa
        if self.fn is aa.posterize and args:
            bits = _posterize_bits(args[0])
            if bits == 0:   # Pillow <= 12's result: every value & 0 -> a black image of the same mode
                return img.point([0] * 256 * len(img.getbands()))
            args = (bits, *args[1:])
        try:
            return self.fn(img, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the op named
            size = "x".join(map(str, getattr(img, "size", ())))
            raise AugmentationError(f"augmentation op {self.name}{tuple(args)} failed on a {size} "
                                    f"{getattr(img, 'mode', type(img).__name__)} image: {type(e).__name__}: {e}") from e


def _ops(transform: Any) -> list[Any]:
    """timm ``AugmentOp`` objects anywhere inside ``transform`` (Compose, RandAugment, AutoAugment, AugMix)."""
    from timm.data.auto_augment import AugmentOp
    if isinstance(transform, AugmentOp):
        return [transform]
    if isinstance(transform, (list, tuple)):     # AutoAugment's policy: a list of sub-policies (lists of ops)
        return [op for child in transform for op in _ops(child)]
    return [op for attr in ("transforms", "ops", "policy") for op in _ops(getattr(transform, attr, None) or [])]


def guard_augment_ops(transform: Any) -> Any:
    """Wrap (in place) every timm augmentation op inside ``transform``; returns ``transform``."""
    for op in _ops(transform):
        if not isinstance(op.aug_fn, GuardedOp):
            op.aug_fn = GuardedOp(op.name, op.aug_fn)
    return transform
