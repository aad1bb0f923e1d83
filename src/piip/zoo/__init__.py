"""The paper's configurations with the released hyper-parameters, one module per model family.

Importing the package registers every family, in this order (the order register hooks such as
timm's registry see):
`.vit_pyramids` (Table I / V ViT pyramids, DINO, ViTDet, ImageNet classifiers), `.hybrid`
(ConvNeXt / ViT, Table II), `.segmentation` (ADE20K UperNet), `.llava` (PIIP-LLaVA
towers), `.internvit` (InternViT-6B, PIIP-H6B / LH6B). Shared branch builders live in
`.builders`, every training recipe in `.recipes`; `.released` (not imported here: it registers
nothing) builds whole released models beyond a backbone. Family modules import only those, never this
package.
"""
from . import vit_pyramids, hybrid, segmentation, llava, internvit  # noqa: F401  (registration order)
from .builders import CONVNEXT_DROP_PATH, CONVNEXT_SIZES, DET_DROP_PATH, VIT_SIZES, convnext, vit
from .recipes import detection_recipe

__all__ = ["VIT_SIZES", "DET_DROP_PATH", "CONVNEXT_SIZES", "CONVNEXT_DROP_PATH", "vit", "convnext",
           "detection_recipe"]
