"""A bounded cache of tensors derived from weights (a folded path, a gated or re-laid-out weight).

Inference recomputes the same products of constant weights on every call: the interaction edges'
fold (``layers/fold.py``), a gate folded into its linear's weight (``ops/linear.py``), the
transposed-convolution weight laid out for one GEMM (``layers/pyramid.py``). Each is cached here by
the weights' identity: address, shape, dtype and device, plus the storage still alive and the
version counter unchanged. So any change of a weight, in place (``optimizer.step``,
``load_state_dict``) or by replacement, recomputes; a freed and reused address never matches.

Callers use it only where no gradient is wanted and nothing is being traced. Weights made under
``inference_mode`` carry no version counter, a change would go unseen: they are not cached, nor
are meta or fake weights, nor anything under a dispatch mode.

An entry is dropped as soon as one of its weight tensors is freed (a weak reference's callback),
so deleting a model frees what was derived from it; the entry bound is a safety net on top.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .symbolic import real

T = TypeVar("T")


class _Entry(NamedTuple):
    alive: tuple[Optional[StorageWeakRef], ...]   # the weights' storages (no strong reference kept)
    versions: tuple[int, ...]
    value: Any
    refs: tuple[weakref.ref, ...]                 # drop the entry when a weight tensor is freed


# an entry counts only while every weight's storage lives and no weight changed in place
_CACHE: dict[tuple, _Entry] = {}
_MAX_ENTRIES = 8192   # a safety net: entries go with their weights; one PIIP-TSBL model keeps 683
_LOCK = threading.Lock()


def trackable(weights: Sequence[Optional[Tensor]]) -> bool:
    """Whether these weights can key the cache: they hold data (not meta or fake tensors), a
    change would be seen (none is an inference tensor), and no dispatch mode is active (under
    FakeTensorMode the derived tensor itself would be fake)."""
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (real(t) and not t.is_inference()) for t in weights)


def cached(tag: str, weights: Sequence[Optional[Tensor]], make: Callable[[], T], *extra: Any,
           limit: Optional[int] = None) -> T:
    """``make()``, computed once per (``tag``, ``extra``, state of ``weights``); computed on every
    call for weights that cannot be tracked. ``limit``: at most that many entries per ``tag`` and
    weights, whatever their ``extra`` (the oldest goes first): a position table per input size,
    where detection may see a new size with every image."""
    if not trackable(weights):
        return make()
    key = (tag, extra, *((None,) if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t.device)
                         for t in weights))
    versions = tuple(-1 if t is None else t._version for t in weights)
    entry = _CACHE.get(key)
    if entry is None or entry.versions != versions or _dead(entry):
        alive = tuple(None if t is None else StorageWeakRef(t.untyped_storage()) for t in weights)
        value = make()
        drop = _dropper(key, value)
        entry = _Entry(alive, versions, value, tuple(weakref.ref(t, drop) for t in weights if t is not None))
        with _LOCK:                        # threads serving one model may miss together
            if len(_CACHE) >= _MAX_ENTRIES:    # drop the dead, then the oldest
                for k in [k for k, e in _CACHE.items() if _dead(e)]:
                    del _CACHE[k]
                while len(_CACHE) >= _MAX_ENTRIES:
                    del _CACHE[next(iter(_CACHE))]
            if limit is not None:
                _CACHE.pop(key, None)          # a recomputed entry becomes the newest of its group
            _CACHE[key] = entry
            if limit is not None:              # the group: same tag and weights, oldest first
                group = [k for k in _CACHE if k[0] == tag and k[2:] == key[2:]]
                for k in group[:-limit]:
                    del _CACHE[k]
    return entry.value


def _dead(entry: _Entry) -> bool:
    """One of the entry's weight storages was freed (its address may now hold another tensor)."""
    return any(w is not None and w.expired() for w in entry.alive)


def _dropper(key: tuple, value: Any) -> Callable[[Any], None]:
    """The weak-reference callback of the entry holding ``value``: removes it unless a newer entry
    took its key. Takes no lock (it may run from the garbage collector inside a locked region); a
    lone dict ``pop`` is atomic under the GIL. The cache is bound here, not looked up as a global:
    a weight freed during interpreter shutdown, after this module's globals were cleared, would
    otherwise print an "Exception ignored ... AttributeError" traceback at exit."""
    cache = _CACHE

    def drop(_ref: Any) -> None:
        current = cache.get(key)
        if current is not None and current.value is value:
            cache.pop(key, None)
    return drop


def clear() -> None:
    """Forget every cached tensor (frees their memory)."""
    with _LOCK:
        _CACHE.clear()
