"""The released PIIP weights by model name, fetched through ``huggingface_hub`` (``pip install
'piip[hub]'``): cached in the Hugging Face cache, read from it offline (``HF_HUB_OFFLINE=1``).

Each registered name maps to the file the official README lists for its config (repo
``OpenGVLab/PIIP``: ``detection/``, ``segmentation/``, ``classification/``), or to nothing when no
checkpoint was released for it. PIIP-LLaVA towers are released only inside whole PIIP-LLaVA models
(``OpenGVLab/PIIP-LLaVA_*`` repos, loaded by ``piip chat --model <repo>``).

Downloads fail fast, in one line. Without a network huggingface_hub retries every file five times
with back-off (about a minute, a screen of "Retrying in 8s" lines) and ends in a ConnectError. So: the local cache is tried first
with the Hub switched off; on a miss, ``HF_HUB_OFFLINE`` set means no network is wanted, and otherwise
one short connection probe decides whether downloading is worth trying at all.
"""
from __future__ import annotations

import contextlib
import socket
from typing import Any, Callable, Iterator, Optional, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
PROBE_TIMEOUT_S = 3.0
_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


@contextlib.contextmanager
def _cache_only(constants: Any) -> Iterator[None]:
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True   # read at call time by huggingface_hub (constants.is_offline_mode)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _not_cached(e: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    while e is not None:
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        e = e.__cause__ or e.__context__
    return False


def hub_unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``endpoint`` cannot be reached (one TCP connection, no retries), or None when it answers."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"
    return None


def from_hub(load: Callable[[], T], what: str, hint: str, error: type = ValueError) -> T:
    """``load()`` (which downloads through huggingface_hub) from the local cache if it is there, else
    from the Hub; every way that fails is one ``error`` (ValueError unless given) naming ``what`` and
    ending in ``hint``."""
    from huggingface_hub import constants
    try:
        with _cache_only(constants):
            return load()
    except Exception as e:  # noqa: BLE001 - only a cache miss moves on to the network
        if not _not_cached(e):
            raise
    cache = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.is_offline_mode():
        raise error(f"{what}: {cache}, and HF_HUB_OFFLINE is set; {hint}") from None
    problem = hub_unreachable(constants.ENDPOINT)
    if problem is not None:
        raise error(f"{what}: {cache}, and the Hub cannot be reached ({problem}); {hint}") from None
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - network / Hub errors become one line; anything else propagates
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in _NETWORK_MODULES:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise error(f"{what}: the Hub download failed ({type(e).__name__}: {first[:200]}); {hint}") from None


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
    return from_hub(lambda: hf.hf_hub_download(repo, filename, cache_dir=cache_dir), f"{repo}/{filename}",
                    f"fetch it once online (`hf download {repo} {filename}`)", error=OSError)


def snapshot(repo: str, cache_dir: Optional[str] = None) -> str:
    """Local folder of a whole Hub repository (e.g. a PIIP-LLaVA model), cached / offline as above."""
    hf = _hub()
    return from_hub(lambda: hf.snapshot_download(repo, cache_dir=cache_dir), repo,
                    f"fetch it once online (`hf download {repo}`)", error=OSError)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        from ..errors import MissingDependency
        raise MissingDependency("released weights are fetched with huggingface_hub: pip install 'piip[hub]'") from None
    return huggingface_hub
