"""Hugging Face Hub downloads (timm branch names, hub ids of LLaVA models) that fail fast, in one line.

Without a network huggingface_hub retries every file five times with back-off (about a minute, a
screen of "Retrying in 8s" lines) and ends in a ConnectError. So: the local cache is tried first
with the Hub switched off; on a miss, ``HF_HUB_OFFLINE`` set means no network is wanted, and otherwise
one short connection probe decides whether downloading is worth trying at all.
"""
from __future__ import annotations

import contextlib
import socket
from typing import Any, Callable, Iterator, TypeVar
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


def from_hub(load: Callable[[], T], what: str, hint: str) -> T:
    """``load()`` (which downloads through huggingface_hub) from the local cache if it is there, else
    from the Hub; every way that fails is one ValueError naming ``what`` and ending in ``hint``."""
    from huggingface_hub import constants
    try:
        with _cache_only(constants):
            return load()
    except Exception as e:  # noqa: BLE001 - only a cache miss moves on to the network
        if not _not_cached(e):
            raise
    cache = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.is_offline_mode():
        raise ValueError(f"{what}: {cache}, and HF_HUB_OFFLINE is set; {hint}") from None
    problem = hub_unreachable(constants.ENDPOINT)
    if problem is not None:
        raise ValueError(f"{what}: {cache}, and the Hub cannot be reached ({problem}); {hint}") from None
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - network / Hub errors become one line; anything else propagates
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in _NETWORK_MODULES:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{what}: the Hub download failed ({type(e).__name__}: {first[:200]}); {hint}") from None
