"""The released PIIP weights by model name, fetched through ``huggingface_hub`` (``pip install
'piip[hub]'``): cached in the Hugging Face cache, read from it offline (``HF_HUB_OFFLINE=1``).

Each registered name maps to the file the official README lists for its config (repo
``OpenGVLab/PIIP``: ``detection/``, ``segmentation/``, ``classification/``), or to nothing when no
checkpoint was released for it. PIIP-LLaVA towers are released only inside whole PIIP-LLaVA models
(``OpenGVLab/PIIP-LLaVA_*`` repos, loaded by ``piip chat --model <repo>``).
"""
from __future__ import annotations

from typing import Optional

REPO = "OpenGVLab/PIIP"


def _det(tag: str, res: str, sched: str = "fpn_1x_coco_bs16") -> str:
    return f"detection/mask_rcnn_{tag}_{res}_{sched}.pth"


def _releases() -> dict[str, str]:
    files = {"vitdet_b_1024": "detection/mask_rcnn_deit_vit_b_fpn_1x_coco_bs16.pth",
             "vitdet_l_1024": "detection/mask_rcnn_deit_vit_l_fpn_1x_coco_bs16.pth",
             "internvit_6b_1024": "detection/mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms.pth",
             "piip_h6b_1024_512": _det("internvit_h6b", "1024_512", "fpn_1x_coco_bs16_ms"),
             "piip_ct_cs_cb_1024_672_448": "detection/mask_rcnn_convnext-tsb_1024_672_448_regular-fpn.pth",
             "piip_sbl_1792_1120_672_dino": "detection/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.pth",
             "piip_h6b_1024_768_dino": "detection/dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms.pth",
             "internvit_6b_512_seg": "segmentation/upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5.pth",
             "piip_tsb_368_192_128_cls": "classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth",
             "piip_sbl_320_160_96_cls": "classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth",
             "piip_sbl_384_192_128_cls": "classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth"}
    for res in ("1120_896_448", "1568_896_448", "1568_1120_672"):
        files[f"piip_tsb_{res}"] = _det("deit_tsb", res)
    for res in ("1120_672_448", "1344_896_448", "1568_896_672", "1568_1120_672"):
        files[f"piip_sbl_{res}"] = _det("deit_sbl", res)
    for res in ("1344_896_672_448", "1568_1120_672_448", "1792_1568_1120_448"):
        files[f"piip_tsbl_{res}"] = _det("deit_tsbl", res)
    for suffix, tag in (("augreg", "augreg"), ("beitv2", "beit"), ("dinov2", "dinov2"), ("mae", "mae"),
                        ("uniperceiver", "uniperceiver")):
        files[f"piip_sbl_1568_1120_672_{suffix}"] = _det(f"{tag}_sbl", "1568_1120_672")
    for low in (192, 256, 384, 512):
        files[f"piip_h6b_512_{low}_seg"] = f"segmentation/upernet_internvit_h6b_{low}_512_80k_ade20k_bs16_lr4e-5.pth"
    return files


RELEASES: dict[str, str] = _releases()
# PIIP-LLaVA towers: the released whole models that contain them (7B first)
LLAVA_RELEASES: dict[str, list[str]] = {
    "piip_llava_clip_bl_512_256": ["OpenGVLab/PIIP-LLaVA_CLIP-BL_512-256_7B"],
    "piip_llava_clip_bl_512_448": ["OpenGVLab/PIIP-LLaVA_CLIP-BL_512-448_7B",
                                   "OpenGVLab/PIIP-LLaVA_CLIP-BL_512-448_13B"],
    "piip_llava_convnext_b_clip_l_640_224": ["OpenGVLab/PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B"],
    "piip_llava_convnext_b_clip_l_1024_336": ["OpenGVLab/PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B",
                                              "OpenGVLab/PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B"],
    "piip_llava_convnext_l_clip_l_1024_336": ["OpenGVLab/PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B",
                                              "OpenGVLab/PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B"],
    "piip_llava_convnext_l_clip_l_1024_336_i24": ["OpenGVLab/PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B"],
}


def released_file(name: str) -> Optional[str]:
    """The file in ``OpenGVLab/PIIP`` released for registered model ``name`` (None: nothing released)."""
    return RELEASES.get(name)


def no_release_message(name: str) -> str:
    if name in LLAVA_RELEASES:
        return (f"{name} was released only inside the PIIP-LLaVA models {LLAVA_RELEASES[name]}: run "
                f"`piip chat --model {LLAVA_RELEASES[name][0]}` (or piip.llava.from_official)")
    return (f"no checkpoint was released for {name}; models with released weights: "
            f"{', '.join(sorted(RELEASES))}")


def download(name: str, cache_dir: Optional[str] = None) -> str:
    """Local path of the checkpoint released for ``name`` (downloaded once, then read from the cache)."""
    filename = released_file(name)
    if filename is None:
        raise ValueError(no_release_message(name))
    return hub_file(REPO, filename, cache_dir)


def hub_file(repo: str, filename: str, cache_dir: Optional[str] = None) -> str:
    hf = _hub()
    try:
        return hf.hf_hub_download(repo, filename, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line naming the repo and file
        raise OSError(_fetch_error(f"{repo}/{filename}", e)) from None


def snapshot(repo: str, cache_dir: Optional[str] = None) -> str:
    """Local folder of a whole Hub repository (e.g. a PIIP-LLaVA model), cached / offline as above."""
    hf = _hub()
    try:
        return hf.snapshot_download(repo, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        raise OSError(_fetch_error(repo, e)) from None


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        from ..errors import MissingDependency
        raise MissingDependency("released weights are fetched with huggingface_hub: pip install 'piip[hub]'") from None
    return huggingface_hub


def _fetch_error(what: str, e: Exception) -> str:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        parts = what.split("/")
        hint = " ".join(["hf download", "/".join(parts[:2]), "/".join(parts[2:])]).strip()
        return (f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and downloads are off "
                f"(HF_HUB_OFFLINE=1 or no connection): fetch it once online (`{hint}`)")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"could not fetch {what} from the Hugging Face Hub: {first}"


def released_detector(name: str, cache_dir: Optional[str] = None, **overrides) -> "object":
    """The whole released Mask R-CNN of ``name``: its backbone and its mmdet neck and heads, converted
    to torchvision names (COCO's 80 classes, names attached)."""
    filename = released_file(name)
    if filename is None or not filename.startswith("detection/mask_rcnn_"):
        what = f"its release is {filename}" if filename else no_release_message(name)
        raise ValueError(f"--pretrained: {name} has no released Mask R-CNN ({what}); released Mask R-CNN models: "
                         f"{', '.join(n for n, f in sorted(RELEASES.items()) if f.startswith('detection/mask_rcnn_'))}")
    path = download(name, cache_dir)
    from ..data.coco import COCO_CLASSES
    from ..registry import create_model
    from ..tasks.detection import build_detector
    from .io import read_state_dict
    from .mmdet_heads import convert_mmdet_heads
    import warnings
    with warnings.catch_warnings():   # "neck/head tensors not loaded": they are, just below
        warnings.filterwarnings("ignore", message=".*neck/head tensors")
        body = create_model(name, checkpoint=path, **overrides)
    det = build_detector(body, len(COCO_CLASSES), "mask_rcnn")
    heads = convert_mmdet_heads(read_state_dict(path))
    missing, unexpected = det.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.body.")]   # loaded with the backbone above
    if missing or unexpected:
        raise ValueError(f"{path}: the neck/heads do not fit a {name} Mask R-CNN: {len(missing)} missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    det.det_cfg.class_names = list(COCO_CLASSES)
    return det
