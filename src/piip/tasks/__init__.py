"""Task models built on the one PIIP backbone."""
from . import registry  # noqa: F401 - the task table; it hands piip export the tasks' entries
from .classification import PIIPClassifier

__all__ = ["PIIPClassifier"]
