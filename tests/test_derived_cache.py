"""lora_kernels/derived_cache.py: the keys of the layers' caches of derived tensors (DoRA's norms, ‖W0‖², the
patched multi-adapter stacks)."""
import gc

import torch

from lora_kernels.derived_cache import cache_get, cache_put, contents_key


def test_hit_while_unchanged_miss_after_an_in_place_write_or_a_new_tensor():
    t, u = torch.randn(4, 3), torch.randn(3)
    cache = {}
    key = contents_key(t, None, u)
    assert cache_get(cache, "n", key) is None
    value = cache_put(cache, "n", key, torch.ones(4), t, None, u)
    assert cache_get(cache, "n", contents_key(t, None, u)) is value
    assert cache_get(cache, "n", contents_key(t.t().t(), None, u)) is value  # a view: its base is the owner
    t.mul_(2)  # the version counter
    assert cache_get(cache, "n", contents_key(t, None, u)) is None
    cache_put(cache, "n", contents_key(t, None, u), value, t, None, u)
    assert cache_get(cache, "n", contents_key(t.clone(), None, u)) is None  # same values, another tensor
    assert cache_get(cache, "n", contents_key(t, None, u.double())) is None
    assert cache_get(cache, "m", contents_key(t, None, u)) is None


def test_a_freed_source_makes_the_entry_miss_even_when_the_key_fields_repeat():
    """What a key of (data pointer, version) alone got wrong: a parameter freed and a new one of the same shape
    allocated at its address (and with its id) starts at version 0 again, so every field of the key repeats.
    The old key itself stands in for the new tensor's here (the same fields, deterministically): with its
    source dead, the entry must miss."""
    cache = {}
    t = torch.randn(5, 2)
    key = contents_key(t)
    cache_put(cache, None, key, "derived from t", t)
    assert cache_get(cache, None, key) == "derived from t"
    del t
    gc.collect()
    assert cache_get(cache, None, key) is None
