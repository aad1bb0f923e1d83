"""Task models built on the one PIIP backbone."""
from .classification import PIIPClassifier

__all__ = ["PIIPClassifier"]
