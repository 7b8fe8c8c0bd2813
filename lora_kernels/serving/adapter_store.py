"""The adapter cache behind `MultiLoRAModel`: which adapter sits in which device slot, which are registered,
and a host tier of validated tensors. Plain Python, no tensors touched, no lock of its own (the model's lock
guards it), so it is testable alone.

Three places an adapter can be, from slowest to fastest:

* **registered**: a name and the directory to read it from (`register`). Costs no memory; an adapter loaded
  from files stays registered after eviction, until `remove` (``unload_adapter``) forgets it.
* **host tier**: up to ``max_cpu_loras`` adapters' validated host tensors (`AdapterWeights`, pinned on CUDA),
  least recently used first out. Inclusive: an adapter in a slot may be there too, so evicting it from its
  slot needs no copy back, and it helps only when ``max_cpu_loras > max_loras``. 0 keeps none: an evicted
  adapter is read from disk (and validated) again when next used.
* **device slot**: one of ``max_loras``; a batch runs only adapters in slots.

A batch (`admit`) brings each adapter it names into a slot: a hit if it is in one, else from the host tier
(a host hit), else from the files read for it (a disk read). A slot is taken free first, else from the least
recently used adapter that the batch does not use, that no running batch pins, and that is not fixed
(trainable adapters, which live only in their slot). A batch naming more distinct adapters than
``max_loras`` raises before anything changes, naming them, and so does one that cannot get enough slots.
Every use of an adapter (a batch, an explicit load) makes it the most recently used, in both tiers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping, NamedTuple, Optional

COUNTERS = ("hits", "host_hits", "disk_reads", "evictions", "host_evictions")


class Source(NamedTuple):
    """Where a registered adapter is read from; `serial` tells a re-registration under the same path apart
    (files read for an older registration are not used)."""
    path: Any
    serial: int


class AdapterStore:
    """Slot table, LRU order, pins, registrations and host tier of one model (see the module docstring).

    The tables are public for reading: ``slot_names`` (slot -> name or None), ``slots`` (name -> slot of the
    adapters in a slot), ``last_used`` (name -> clock, adapters in a slot), ``pins`` (name -> running
    batches), ``fixed`` (names never evicted), ``sources`` (name -> Source), ``host`` (name -> weights, least
    recently used first), ``counters``. Change them only through the methods.
    """

    def __init__(self, max_loras: int, max_cpu_loras: int = 0):
        for name, v, lo in (("max_loras", max_loras, 1), ("max_cpu_loras", max_cpu_loras, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.max_loras, self.max_cpu_loras = max_loras, max_cpu_loras
        self.slot_names: list[Optional[str]] = [None] * max_loras
        self.slots: dict[str, int] = {}
        self.last_used: dict[str, int] = {}
        self.pins: dict[str, int] = {}
        self.fixed: set[str] = set()
        self.sources: dict[str, Source] = {}
        self.host: OrderedDict[str, Any] = OrderedDict()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._clock = 0  # an int, not itertools.count: the store is deep-copied with its model

    # ---------------------------------------------------------------------------------------- queries

    def known(self, name: str) -> bool:
        return name in self.sources or name in self.slots

    def names(self) -> list[str]:
        """Every adapter the store knows: registered or in a slot."""
        return sorted(set(self.sources) | set(self.slots))

    def check_known(self, names: Iterable[Optional[str]]) -> None:
        for n in names:
            if n is not None and not self.known(n):
                known = self.names()  # a server may register thousands: name a few
                more = f" and {len(known) - 8} more" if len(known) > 8 else ""
                raise KeyError(f"unknown adapter {n!r}; loaded: {known[:8]}{more}")

    def check_batch(self, names: Iterable[Optional[str]]) -> list[str]:
        """The distinct adapters of a batch (first-appearance order, which the LRU order follows), after
        checking that they can all be in slots at once; raises (and changes nothing) otherwise."""
        distinct = [n for n in dict.fromkeys(names) if n is not None]
        self.check_known(distinct)
        if len(distinct) > self.max_loras:
            raise ValueError(f"the batch uses {len(distinct)} distinct adapters {distinct}, more than the "
                             f"max_loras={self.max_loras} slots that one forward can hold: split the batch or raise "
                             "max_loras")
        self._slots_for([n for n in distinct if n not in self.slots], protect=distinct)
        return distinct

    def to_read(self, names: Iterable[str]) -> dict[str, Source]:
        """The adapters among `names` (checked) that are neither in a slot nor in the host tier: what a batch
        must read from disk, and where from."""
        return {n: self.sources[n] for n in names if n not in self.slots and n not in self.host}

    def stats(self) -> dict[str, int]:
        """The counters (hits, host_hits, disk_reads, evictions, host_evictions) and the current sizes:
        registered (every adapter the store knows, fixed ones included), in slots (resident), in the host
        tier (host)."""
        # Each known adapter is either registered with a source or fixed (in a slot, with none).
        return dict(self.counters, registered=len(self.sources) + len(self.fixed), resident=len(self.slots),
                    host=len(self.host))

    # ---------------------------------------------------------------------------------------- slots

    def _slots_for(self, names: list[str], protect: Iterable[str]) -> list[tuple[int, Optional[str]]]:
        """(slot, adapter evicted from it or None) for each of `names`: free slots (lowest first), then the
        least recently used adapters that are not in `protect`, not pinned and not fixed. Changes nothing."""
        free = [s for s, n in enumerate(self.slot_names) if n is None]
        if len(names) <= len(free):
            return [(s, None) for s in free[:len(names)]]
        keep = set(protect)
        idle = sorted((n for n in self.slots if n not in keep and not self.pins.get(n) and n not in self.fixed),
                      key=self.last_used.__getitem__)
        need = len(names) - len(free)
        if len(idle) < need:
            raise RuntimeError(f"all {self.max_loras} adapter slots are used by running batches or trainable "
                               "adapters; finish one, unload one or raise max_loras")
        return [(s, None) for s in free] + [(self.slots[n], n) for n in idle[:need]]

    def _occupy(self, slot: int, name: str, evicted: Optional[str]) -> None:
        if evicted is not None:
            del self.slots[evicted], self.last_used[evicted]
            self.counters["evictions"] += 1
        self.slot_names[slot] = name
        self.slots[name] = slot

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, name: str) -> None:
        self.last_used[name] = self._tick()
        if name in self.host:
            self.host.move_to_end(name)

    def _host_put(self, name: str, weights: Any) -> None:
        if self.max_cpu_loras == 0:
            return
        self.host[name] = weights
        self.host.move_to_end(name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)
            self.counters["host_evictions"] += 1

    def _release(self, name: str) -> Optional[int]:
        """Take `name` out of its slot (if in one); the freed slot."""
        slot = self.slots.pop(name, None)
        if slot is not None:
            self.slot_names[slot] = None
            self.last_used.pop(name, None)
        self.fixed.discard(name)
        return slot

    def _check_unpinned(self, name: str, what: str) -> None:
        if self.pins.get(name):
            raise RuntimeError(f"adapter {name!r} is in use by a running batch and cannot be {what} now")

    def admit(self, names: Iterable[Optional[str]], read: Mapping[str, tuple[Source, Any]]
              ) -> list[tuple[int, str, Any]]:
        """Bring a batch's adapters into slots and make them the most recently used; returns the slot writes
        the model must make, (slot, name, weights). read: {name: (its Source when read, weights)} for the
        adapters `to_read` listed. Raises (KeyError, ValueError, RuntimeError, or KeyError for an adapter
        that needs files not in `read`) before changing anything."""
        distinct = self.check_batch(names)
        missing = [n for n in distinct if n not in self.slots]
        fresh = {}
        for n in missing:
            if n not in self.host:
                got = read.get(n)
                if got is None or got[0] != self.sources[n]:
                    raise KeyError(f"adapter {n!r} must be read from {self.sources[n].path} first")
                fresh[n] = got[1]
        targets = self._slots_for(missing, protect=distinct)
        writes = []
        for n in distinct:
            self.counters["hits" if n in self.slots else "host_hits" if n in self.host else "disk_reads"] += 1
        # Weights first (a disk read entering the host tier may push another of this batch out of it).
        weights = {n: fresh[n] if n in fresh else self.host[n] for n in missing}
        for n, (slot, evicted) in zip(missing, targets):
            self._occupy(slot, n, evicted)
            writes.append((slot, n, weights[n]))
        for n in distinct:
            if n in fresh:
                self._host_put(n, fresh[n])
            self._touch(n)
        return writes

    def place(self, name: str, source: Optional[Any] = None, weights: Any = None) -> int:
        """Put one adapter in a slot now (its own if it has one) and return the slot: an adapter read from
        `source` (a disk read: registered, and kept in the host tier) or, with no source, a fixed one that
        is never evicted (a trainable adapter). Raises RuntimeError, changing nothing, when it is pinned or
        no slot can be freed."""
        if name in self.slots:
            self._check_unpinned(name, "reloaded")
            slot, evicted = self.slots[name], None
        else:
            (slot, evicted), = self._slots_for([name], protect=())
        self._occupy(slot, name, evicted)
        self.host.pop(name, None)
        self.fixed.discard(name)
        if source is None:
            self.sources.pop(name, None)
            self.fixed.add(name)
        else:
            self.sources[name] = Source(source, self._tick())
            self.counters["disk_reads"] += 1
            self._host_put(name, weights)
        self._touch(name)
        return slot

    def register(self, name: str, source: Any) -> Optional[int]:
        """Record `name` as read from `source` when first used, without a slot; a previous adapter of that
        name leaves its slot and the host tier. Returns the slot it freed (to be cleared), or None. Raises
        RuntimeError, changing nothing, when the name is pinned."""
        self._check_unpinned(name, "reloaded")
        slot = self._release(name)
        self.host.pop(name, None)
        self.sources[name] = Source(source, self._tick())
        return slot

    def remove(self, name: str) -> Optional[int]:
        """Forget `name` entirely; the slot it freed (to be cleared), or None. KeyError when unknown,
        RuntimeError when pinned; either changes nothing."""
        self.check_known([name])
        self._check_unpinned(name, "unloaded")
        slot = self._release(name)
        self.host.pop(name, None)
        self.sources.pop(name, None)
        return slot

    def pin(self, names: Iterable[str]) -> None:
        for n in names:
            self.pins[n] = self.pins.get(n, 0) + 1

    def unpin(self, names: Iterable[str]) -> None:
        for n in names:
            self.pins[n] -= 1
            if not self.pins[n]:
                del self.pins[n]  # names come and go: keep the table as small as the pinned set
