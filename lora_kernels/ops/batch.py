"""The per-step metadata of the multi-adapter ops: `LoRABatch` (which adapter slot each token uses, grouped
for the kernels) and `SlotDropout` (the step's per-slot LoRA dropout). Build each once per step and share it
across layers: every host read a step needs happens here, while the batch is built (or, for the segment bounds
the PyTorch backend walks, once per batch on first use), never per layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lora_kernels.dropout import SEED_HIGH, SEED_LOW, keep_threshold, new_seed
from lora_kernels.kernels.tiling import num_tiles, tile_block_m
from lora_kernels.ops.plumbing import shape_str as _shape


def _ids_tensor(ids: Sequence[int], device) -> Tensor:
    """Python ids as an int32 tensor on `device`. To CUDA through pinned memory without blocking the host:
    a plain torch.tensor(..., device="cuda") is a synchronous copy."""
    t = torch.as_tensor(list(ids), dtype=torch.int32)
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device is None else t.to(device)


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter slot each token of a batch uses, grouped for the kernels. Build it once per step.

    All tensors are int32 on the token_adapter's device; their shapes depend only on T and L = num_slots
    (NT = `num_tiles(T, L)`), so a decode step that builds it can be captured in a CUDA graph.

    token_adapter:    [T]  slot of each token, -1 = none (ids outside [-1, L) are an error).
    sorted_token_ids: [T]  token indices stably sorted by slot, the -1 tokens last ("sorted order").
    seg_starts:       [L]  slot l's tokens are sorted_token_ids[seg_starts[l] : seg_starts[l] + seg_lens[l]].
    seg_lens:         [L]  number of tokens on slot l (0 for an inactive slot).
    active_slots:     [L]  the slots with >= 1 token, ascending, then -1 padding.
    num_active:       [1]  how many entries of active_slots are slots.
    tile_slot:        [NT] segment tiles of at most `block_m` sorted positions, one slot each: tile i covers
    tile_start:       [NT] sorted positions [tile_start[i], tile_end[i]) of slot tile_slot[i]; unused tiles
    tile_end:         [NT] have tile_slot = -1. The -1 tokens are in no tile.
    """

    token_adapter: Tensor
    sorted_token_ids: Tensor
    seg_starts: Tensor
    seg_lens: Tensor
    active_slots: Tensor
    num_active: Tensor
    tile_slot: Tensor
    tile_start: Tensor
    tile_end: Tensor
    num_slots: int
    block_m: int
    # Host copies of (seg_starts, seg_lens), read once per batch on first use (`host_segments`).
    _host: list = field(default_factory=list, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.token_adapter.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    def op_args(self) -> "BatchTensors":
        """The seven tensors the registered ops take, in schema order (a tuple that also reaches the batch's
        host copies, see `host_segments`)."""
        bt = self.__dict__.get("_op_args")
        if bt is None:
            bt = BatchTensors((self.token_adapter, self.sorted_token_ids, self.seg_starts, self.seg_lens,
                               self.tile_slot, self.tile_start, self.tile_end))
            bt.batch = self
            object.__setattr__(self, "_op_args", bt)
        return bt

    def host_segments(self) -> tuple[list[int], list[int]]:
        """(seg_starts, seg_lens) as host ints: read once per batch (one sync on CUDA), then shared by every
        layer of the step (the PyTorch backend walks the segments on the host)."""
        if not self._host:
            self._host.append((self.seg_starts.tolist(), self.seg_lens.tolist()))
        return self._host[0]

    @classmethod
    def from_token_adapters(cls, token_adapter: Union[Tensor, Sequence[int]], num_slots: int,
                            device: Optional[Union[torch.device, str]] = None, check: bool = True) -> "LoRABatch":
        """Build the metadata from per-token slot ids ([T] ints, -1 = no adapter) with torch ops only.

        check=True (default): an id outside [-1, num_slots) raises ValueError here, before any kernel
        sees the batch; on CUDA that costs one host read of a flag (a sync, once per step, not per layer).
        A Python list goes to the device through pinned memory, without a blocking copy.
        check=False: nothing is read back, so the batch can be built inside a CUDA-graph capture or a hot
        decode loop whose ids are known valid (serving builds them from its own slot table); a bad id then
        stops the stream with a device-side assert (torch._assert_async) instead of computing anything.
        """
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if not isinstance(token_adapter, Tensor):
            token_adapter = _ids_tensor(token_adapter, device)
        elif device is not None:
            token_adapter = token_adapter.to(device)
        if token_adapter.dim() != 1:
            raise ValueError(f"token_adapter must have shape [T], got {_shape(token_adapter)}")
        if token_adapter.dtype.is_floating_point or token_adapter.dtype.is_complex or token_adapter.dtype == torch.bool:
            raise TypeError(f"token_adapter must be an integer tensor, got {token_adapter.dtype}")
        L = num_slots
        ta = token_adapter.to(torch.int32)
        valid = (ta >= 0) & (ta < L)
        bad = (ta < -1) | (ta >= L)
        if check or ta.device.type == "cpu":
            if bool(bad.any()):
                vals = sorted(set(ta[bad].tolist()))[:8]
                raise ValueError(f"token_adapter ids must lie in [-1, num_slots={L}), got {vals}")
        else:
            torch._assert_async(~bad.any(), f"token_adapter ids must lie in [-1, num_slots={L})")
        T = ta.shape[0]
        dev = ta.device
        # -1 (and, until the assert fires, bad ids) sort last as key L.
        key = torch.where(valid, ta, torch.full_like(ta, L))
        _, perm = torch.sort(key, stable=True)
        # scatter_add_ rather than bincount: bincount sizes its output from max(key), a host sync on CUDA.
        counts = torch.zeros(L + 1, dtype=torch.int64, device=dev).scatter_add_(
            0, key.long(), torch.ones(T, dtype=torch.int64, device=dev))
        seg_lens = counts[:L]
        seg_starts = torch.cumsum(counts, 0)[:L] - seg_lens
        order = torch.argsort((seg_lens == 0).to(torch.int32), stable=True)
        active_slots = torch.where(seg_lens[order] > 0, order, torch.full_like(order, -1))
        num_active = (seg_lens > 0).sum().reshape(1)
        # Segment tiles: tile i belongs to the slot whose cumulative tile count first exceeds i.
        bm = tile_block_m(T)
        NT = num_tiles(T, L)
        tiles_per = (seg_lens + bm - 1) // bm
        cum = torch.cumsum(tiles_per, 0)
        i = torch.arange(NT, dtype=torch.int64, device=dev)
        tslot = torch.searchsorted(cum, i, right=True)
        used = tslot < L
        ts = tslot.clamp(max=L - 1)
        start = seg_starts[ts] + (i - (cum[ts] - tiles_per[ts])) * bm
        end = torch.minimum(start + bm, seg_starts[ts] + seg_lens[ts])
        i32 = torch.int32
        return cls(
            token_adapter=ta, sorted_token_ids=perm.to(i32), seg_starts=seg_starts.to(i32),
            seg_lens=seg_lens.to(i32), active_slots=active_slots.to(i32), num_active=num_active.to(i32),
            tile_slot=torch.where(used, tslot, -1).to(i32), tile_start=torch.where(used, start, 0).to(i32),
            tile_end=torch.where(used, end, 0).to(i32), num_slots=L, block_m=bm)

    @classmethod
    def from_sequences(cls, seq_slots: Union[Tensor, Sequence[int]], seq_len: int, num_slots: int,
                       device: Optional[Union[torch.device, str]] = None, check: bool = True) -> "LoRABatch":
        """For a [B, seq_len] batch flattened row-major: every token of sequence b uses seq_slots[b]."""
        if not isinstance(seq_slots, Tensor):
            seq_slots = _ids_tensor(seq_slots, device)
        elif device is not None:
            seq_slots = seq_slots.to(device)
        return cls.from_token_adapters(seq_slots.reshape(-1, 1).expand(-1, seq_len).reshape(-1), num_slots,
                                       check=check)


class BatchTensors(tuple):
    """`LoRABatch.op_args()`: the seven tensors, plus the batch they came from (`batch`; None for a plain tuple
    rebuilt from a registered op's arguments)."""
    batch: Optional[LoRABatch] = None


def host_segments(bt) -> tuple[list[int], list[int]]:
    """(seg_starts, seg_lens) of the batch tensors `bt` as host ints: the batch's copy when `bt` came from a
    LoRABatch, else read now (the registered ops' path)."""
    batch = getattr(bt, "batch", None)
    if batch is not None:
        return batch.host_segments()
    return bt[2].tolist(), bt[3].tolist()


# ----------------------------------------------------------------------------------------------------
# Per-slot LoRA dropout of one step
# ----------------------------------------------------------------------------------------------------

_SEED_SPAN = SEED_HIGH - SEED_LOW
_GOLDEN = 0x9E3779B97F4A7C15  # odd: i -> base + i * _GOLDEN is a bijection mod 2**64


@dataclass(frozen=True, eq=False)
class StepDropout:
    """One step's per-slot LoRA dropout over L slots, made once per step: the host floats and the device vectors
    every backend takes, so no layer reads the rates back (on CUDA each read is a sync).

    p:          the L probabilities in [0, 1) (host floats).
    probs:      [L] float64 on the step's device: what the registered ops and the C++ ops take.
    threshold:  [L] int32: `lora_kernels.dropout.keep_threshold(p_l)` (0: keep everything).
    keep_scale: [L] float32: 1 / (1 - p_l).
    The seeds of the step's calls come from one base seed drawn from torch's CPU generator when the step is
    built (`torch.manual_seed` reproduces a run): `next_seed()` gives each call its own, as a host int.
    """
    p: tuple
    probs: Tensor
    threshold: Tensor
    keep_scale: Tensor
    base_seed: int
    _calls: list = field(default_factory=lambda: [0], repr=False)

    @classmethod
    def build(cls, p: Sequence[float], device=None) -> Optional["StepDropout"]:
        """None when no slot has dropout; checks every rate is in [0, 1)."""
        ps = tuple(float(q) for q in p)
        bad = [q for q in ps if not 0.0 <= q < 1.0]
        if bad:
            raise ValueError(f"dropout_p must lie in [0, 1) for every slot, got {bad[:8]}")
        if not any(ps):
            return None
        f64 = torch.tensor(ps, dtype=torch.float64)
        thr = torch.tensor([keep_threshold(q) for q in ps], dtype=torch.int32)
        keep = torch.tensor([1.0 / (1.0 - q) for q in ps], dtype=torch.float32)
        if device is not None and torch.device(device).type != "cpu":
            f64, thr, keep = (t.pin_memory().to(device, non_blocking=True) for t in (f64, thr, keep))
        return cls(ps, f64, thr, keep, int(new_seed().item()))

    def next_seed(self) -> int:
        """A fresh seed in [SEED_LOW, SEED_HIGH) for the step's next call (a host int; no device read)."""
        i = self._calls[0]
        self._calls[0] = i + 1
        return SEED_LOW + ((self.base_seed + i * _GOLDEN) & (2**64 - 1)) % _SEED_SPAN


def dropout_rates(dropout) -> tuple:
    """The per-slot probabilities as host floats: `dropout` is a StepDropout (free) or a [L] tensor (read)."""
    return dropout.p if isinstance(dropout, StepDropout) else tuple(dropout.tolist())


def dropout_tensor(dropout) -> Optional[Tensor]:
    """The [L] float64 probabilities the registered and C++ ops take."""
    return dropout.probs if isinstance(dropout, StepDropout) else dropout
