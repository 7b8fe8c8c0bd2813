"""`AdapterStore` alone (plain Python, no model, no tensors): the slot table, LRU among adapters the batch
does not use, pins, fixed (trainable) adapters, registrations, the host tier and the counters; a batch or a
load that cannot be served raises and changes nothing."""
from __future__ import annotations

import copy

import pytest

from lora_kernels.serving.adapter_store import AdapterStore


def state(st):
    return copy.deepcopy((st.slot_names, st.slots, st.last_used, st.pins, st.fixed, st.sources, list(st.host.items()),
                          st.counters))


def store(max_loras=2, max_cpu_loras=0, names="abcd"):
    st = AdapterStore(max_loras, max_cpu_loras)
    for n in names:
        st.register(n, f"/adapters/{n}")
    return st


def serve(st, names):
    """What a model does for a batch: read what `to_read` lists ("weights" are strings here), then admit."""
    read = {n: (src, f"w:{n}") for n, src in st.to_read(st.check_batch(names)).items()}
    return st.admit(names, read)


def test_batches_bring_adapters_in_and_evict_lru_outside_the_batch():
    st = store(max_loras=2)
    assert st.slots == {} and st.stats()["registered"] == 4
    assert serve(st, ["a", None, "b", "a"]) == [(0, "a", "w:a"), (1, "b", "w:b")]
    assert serve(st, ["b"]) == []                                     # a hit: nothing to write
    assert serve(st, ["c", "a"]) == [(1, "c", "w:c")]                 # evicts "b", although more recent than
    assert st.slots == {"a": 0, "c": 1}                               # "a": the batch uses "a"
    assert serve(st, ["d"]) == [(1, "d", "w:d")]                      # "c" came first in its batch: LRU
    assert st.counters == dict(hits=2, host_hits=0, disk_reads=4, evictions=2, host_evictions=0)


def test_too_many_adapters_raises_naming_them_and_changes_nothing():
    st = store(max_loras=2)
    serve(st, ["a"])
    before = state(st)
    with pytest.raises(ValueError, match=r"3 distinct adapters \['b', 'c', 'a'\], more than the max_loras=2"):
        serve(st, ["b", "c", "a", "b"])
    with pytest.raises(KeyError, match=r"unknown adapter 'zz'; loaded: \['a', 'b', 'c', 'd'\]"):
        serve(st, ["a", "zz"])
    assert state(st) == before


def test_pins_and_fixed_adapters_are_never_evicted():
    st = store(max_loras=2)
    serve(st, ["a"])
    assert st.place("t") == 1 and st.fixed == {"t"} and "t" not in st.sources  # a trainable adapter
    st.pin(["a"])
    before = state(st)
    with pytest.raises(RuntimeError, match="used by running batches or trainable adapters"):
        serve(st, ["b"])
    with pytest.raises(RuntimeError, match="used by running batches"):
        st.place("c", source="/adapters/c", weights="w")
    with pytest.raises(RuntimeError, match="in use by a running batch and cannot be reloaded"):
        st.register("a", "/elsewhere")
    with pytest.raises(RuntimeError, match="in use by a running batch and cannot be unloaded"):
        st.remove("a")
    assert state(st) == before
    st.unpin(["a"])
    assert st.pins == {} and serve(st, ["b", "t"]) == [(0, "b", "w:b")]
    assert st.slots == {"b": 0, "t": 1}


def test_host_tier_is_lru_and_inclusive():
    st = store(max_loras=1, max_cpu_loras=2)
    serve(st, ["a"])
    serve(st, ["b"])                        # evicts "a" from its slot; both stay in the host tier
    assert list(st.host) == ["a", "b"] and st.to_read(["a"]) == {}
    assert serve(st, ["a"]) == [(0, "a", "w:a")]                  # a host hit: the tier's own weights
    assert list(st.host) == ["b", "a"]
    serve(st, ["c"])                        # a disk read: pushes the LRU "b" out of the host tier
    assert list(st.host) == ["a", "c"] and "b" in st.to_read(["b"])
    assert st.counters == dict(hits=0, host_hits=1, disk_reads=3, evictions=3, host_evictions=1)
    assert st.stats() == dict(st.counters, registered=4, resident=1, host=2)


def test_files_read_for_an_older_registration_are_not_used():
    st = store(max_loras=1)
    src = st.to_read(["a"])["a"]
    st.register("a", "/adapters/a")         # re-registered (same path, newer files) meanwhile
    before = state(st)
    with pytest.raises(KeyError, match="must be read from /adapters/a first"):
        st.admit(["a"], {"a": (src, "stale")})
    assert state(st) == before


def test_place_register_remove():
    st = store(max_loras=2, max_cpu_loras=4, names="")
    assert st.place("a", source="/a", weights="wa") == 0 and st.place("b", source="/b", weights="wb") == 1
    assert st.place("a", source="/a2", weights="wa2") == 0            # a reload keeps its slot
    assert st.host["a"] == "wa2" and st.sources["a"].path == "/a2"
    assert st.register("a", "/a3") == 0 and "a" not in st.slots and "a" not in st.host  # stale: out
    assert st.remove("b") == 1 and not st.known("b") and "b" not in st.host
    assert st.remove("a") is None and st.names() == []
    with pytest.raises(KeyError, match="unknown adapter 'a'"):
        st.remove("a")
    assert st.counters["disk_reads"] == 3


@pytest.mark.parametrize("bad", [dict(max_loras=0), dict(max_loras=1, max_cpu_loras=-1),
                                 dict(max_loras=1, max_cpu_loras=1.5)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be an int >="):
        AdapterStore(**bad)


def test_unknown_name_message_stays_short_with_many_registered():
    st = store(names=[f"n{i:03d}" for i in range(500)])
    with pytest.raises(KeyError, match=r"unknown adapter 'x'; loaded: \['n000', .*, 'n007'\] and 492 more"):
        st.check_batch(["x"])
    assert st.stats()["registered"] == 500
