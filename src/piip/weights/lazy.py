"""Loading without a second copy: checkpoints are memory-mapped (no read into memory), the model is
built on the ``meta`` device (no weights), and each tensor is materialised on its own, straight from
the mapped file, into the model (``load_state_dict(assign=True)``). This module is the one place for
both halves (:func:`fast_meta_init`, :func:`materialize`), used by the registry (which builds), the
weight loaders and the FLOP counter; it builds nothing itself, so it needs none of them.

Memory then peaks at one copy of the weights, instead of the randomly initialised model + the file's
tensors + the copy into the model: the file pages a tensor was copied from are handed back right away
(``madvise(MADV_DONTNEED)`` on its private, unmodified mapping; Linux), so they do not pile up in the
process's resident set either. Works for ``.safetensors``
files, sharded safetensors (``*.safetensors.index.json``, Hugging Face layout) and zip-format
``.pth`` / ``.pt`` / ``.bin`` files (``torch.load(mmap=True)``); legacy-format pickles cannot be mapped
and are read whole (the caller then falls back to the ordinary path).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import struct
import sys
from typing import Any, Iterator, MutableMapping, Optional
from unittest import mock

import torch
from torch import Tensor, nn

from .io import _numpy_array_globals, check_state_dict, read_checkpoint, unwrap_state_dict

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class MappedStateDict(dict):
    """Name -> tensor, plus ``ranges``: the (start, end) addresses of the file mappings the tensors view."""

    ranges: list[tuple[int, int]]


def _storage_range(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def map_safetensors(path: str) -> MappedStateDict:
    """Every tensor of a safetensors file as a view of one private memory map of the file (nothing read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint {path!r} cannot be read as safetensors (truncated: no header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint {path!r} cannot be read as safetensors (bad header: {e})") from None
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = MappedStateDict()
    out.ranges = [(storage.data_ptr(), storage.data_ptr() + size)]
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        begin, end = (8 + n + o for o in info["data_offsets"])
        if dtype is None or end > size:
            raise ValueError(f"checkpoint {path!r}: tensor {name!r} has an unsupported dtype {info.get('dtype')} "
                             "or lies beyond the end of the file (truncated?)")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # unaligned in the file: this one tensor is copied
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out


def map_state_dict(path: str) -> Optional[MappedStateDict]:
    """The checkpoint's tensors, memory-mapped (see module doc), unwrapped like
    :func:`~piip.weights.io.read_state_dict`; None when the file cannot be mapped (legacy pickle)."""
    path = os.fspath(path)
    if path.endswith(".safetensors.index.json"):
        with open(path) as f:
            index = json.load(f)
        folder, out = os.path.dirname(path), MappedStateDict()
        out.ranges = []
        for shard in sorted(set(index.get("weight_map", {}).values())):
            part = map_safetensors(os.path.join(folder, shard))
            out.update(part)
            out.ranges += part.ranges
        if not out:
            raise ValueError(f"{path}: no 'weight_map' entries; expected a Hugging Face safetensors index")
        return out
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            read_checkpoint(path)  # the usual missing-file / folder errors
        return map_safetensors(path)
    if not os.path.isfile(path):
        read_checkpoint(path)  # the usual missing-file / folder errors
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy pickle or unreadable: the ordinary reader says which
        return None
    out = MappedStateDict(unwrap_state_dict(obj, path))
    out.ranges = sorted({_storage_range(t) for t in out.values()})  # every storage is a view of the file
    return out


# ---------------------------------------------------------------------------- handing file pages back
_MADV_DONTNEED = 4
_releasable: list[tuple[int, int]] = []


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_madvise = _libc_madvise()


@contextlib.contextmanager
def releasing_file_pages(sd: MappedStateDict) -> Iterator[None]:
    """While loading from ``sd``, :func:`materialize` drops the file pages of each tensor it has copied.
    Only addresses inside ``sd``'s file mappings are ever touched, and only within this scope (where
    ``sd`` keeps the mappings alive)."""
    global _releasable
    previous, _releasable = _releasable, list(getattr(sd, "ranges", []))
    try:
        yield
    finally:
        _releasable = previous


def _release(t: Tensor) -> None:
    if _madvise is None or not _releasable or t.nbytes == 0:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.nbytes
    if not any(a <= start and end <= b for a, b in _releasable):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)  # private, never written: re-read from the file if touched


def materialize(module: nn.Module, sd: MutableMapping[str, Tensor], source: str = "checkpoint") -> None:
    """Give a (meta-device) ``module`` the tensors of ``sd`` (names = ``module.state_dict()``'s, checked
    strictly before), one at a time: each is copied out of the mapped file, cast to the module's dtype,
    and its entry dropped from ``sd``. Afterwards no tensor of ``module`` is left on ``meta``."""
    check_state_dict(module, sd, source)
    own = module.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for k in list(sd):
        v = sd.pop(k)
        target = own[k]
        out[k] = v.to(dtype=target.dtype, copy=True) if target.is_floating_point() else v.clone()
        _release(v)
        del v
    module.load_state_dict(out, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: after loading, {len(left)} tensors are still on the meta device: {left[:5]}")


@contextlib.contextmanager
def fast_meta_init() -> Iterator[None]:
    """Build on the meta device (shapes only, no memory) and skip timm's truncated-normal init, which is
    slow there and pointless: the weights come from a file (:func:`materialize`) or are never used
    (FLOP counting). The registry's ``build_on_meta`` builds a config this way."""
    from .. import backbone as _bb
    from ..branches import vit as _vit
    from ..tasks import classification as _cls

    def noop(t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return t

    with torch.device("meta"), contextlib.ExitStack() as stack:
        for mod in (_bb, _vit, _cls):
            stack.enter_context(mock.patch.object(mod, "trunc_normal_", noop))
        yield
