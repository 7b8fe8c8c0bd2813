"""Caches of values derived from a layer's tensors (DoRA's row norms, ‖W0_j‖², the zero-padded adapter stacks of
a patched multi-adapter layer), valid while those tensors are unchanged.

A cache entry is keyed on each source tensor's owner object (a view's base: the Parameter the view was taken of),
data pointer, version counter (bumped by every in-place write through autograd-visible ops: an optimizer step,
``load_state_dict``, ``mul_`` under ``no_grad``), dtype and shape, and it holds weak references to the owners. The
weak references close the hole a key of addresses alone leaves: a parameter freed and a new one of the same shape
allocated at its address (and given its ``id``) starts at version 0 again, so (pointer, version) would match and
the old value would be returned. With the owner dead the entry misses. Writes through ``.data`` / ``set_`` bypass
version counters: layers clear their caches on merge / unmerge, the only places they write that way.
"""
from __future__ import annotations

import weakref
from typing import Any, Hashable, Optional

from torch import Tensor


def _owner(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def contents_key(*tensors: Optional[Tensor]) -> tuple:
    """What identifies the current contents of `tensors` (None entries allowed): see the module docstring."""
    return tuple(None if t is None else (id(_owner(t)), t.data_ptr(), t._version, t.dtype, t.shape)
                 for t in tensors)


def cache_get(cache: dict, slot: Hashable, key: tuple) -> Any:
    """cache[slot]'s value when it was stored under `key` and every tensor it was derived from is still alive
    (so the ids in `key` are still theirs), else None."""
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        return None
    for ref in hit[2]:
        if ref() is None:
            return None
    return hit[1]


def cache_put(cache: dict, slot: Hashable, key: tuple, value: Any, *tensors: Optional[Tensor]) -> Any:
    """Store `value` under `key` (from `contents_key(*tensors)`) with weak references to the tensors' owners;
    returns `value`."""
    cache[slot] = (key, value, tuple(weakref.ref(_owner(t)) for t in tensors if t is not None))
    return value
