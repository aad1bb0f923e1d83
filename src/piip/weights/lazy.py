"""Loading without a second copy: checkpoints are memory-mapped (no read into memory), the model is
built on the ``meta`` device (no weights), and each tensor is materialised on its own, straight from
the mapped file, into the model (``load_state_dict(assign=True)``).

Memory then peaks at one copy of the weights (plus file pages the kernel may drop), instead of the
randomly initialised model + the file's tensors + the copy into the model. Works for ``.safetensors``
files, sharded safetensors (``*.safetensors.index.json``, Hugging Face layout) and zip-format
``.pth`` / ``.pt`` / ``.bin`` files (``torch.load(mmap=True)``); legacy-format pickles cannot be mapped
and are read whole (the caller then falls back to the ordinary path).
"""
from __future__ import annotations

import json
import os
import struct
from typing import MutableMapping, Optional

import torch
from torch import Tensor, nn

from .io import _numpy_array_globals, check_state_dict, read_checkpoint, unwrap_state_dict

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def map_safetensors(path: str) -> dict[str, Tensor]:
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
    out = {}
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


def map_state_dict(path: str) -> Optional[dict[str, Tensor]]:
    """The checkpoint's tensors, memory-mapped (see module doc), unwrapped like
    :func:`~piip.weights.io.read_state_dict`; None when the file cannot be mapped (legacy pickle)."""
    path = os.fspath(path)
    if path.endswith(".safetensors.index.json"):
        with open(path) as f:
            index = json.load(f)
        folder, out = os.path.dirname(path), {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(map_safetensors(os.path.join(folder, shard)))
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
    return unwrap_state_dict(obj, path)


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
        del v
    module.load_state_dict(out, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: after loading, {len(left)} tensors are still on the meta device: {left[:5]}")


def build_on_meta(cfg) -> nn.Module:  # noqa: ANN001 - PIIPConfig (import cycle)
    """The model of ``cfg`` on the meta device: shapes only, no memory, no initialisation cost."""
    from ..complexity import _fast_meta_init
    from ..registry import build_from_config
    with _fast_meta_init():
        return build_from_config(cfg)
