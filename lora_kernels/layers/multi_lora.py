"""`MultiLoRALinear`: a frozen nn.Linear plus `max_loras` adapter slots, one adapter per token, for serving
(slot buffers) and for training many adapters in one batch (per-slot parameters, `StepBatch`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear, run_linear


@dataclass(frozen=True)
class StepBatch:
    """One training step's batch over only the slots it uses: `batch` is a LoRABatch over L' = len(slots)
    compact slots, and compact slot j is layer slot ``slots[j]``. Build it once per step, outside any
    compiled region (`from_sequences` reads its ids on the host), and share it across layers.

    slots:      the layer slots present, ascending (host ints).
    slot_index: [L'] int64 on the batch's device, `slots` as a tensor (gathers the slots' scalings / ranks).
    dropout_p:  [L'] float64 per-slot LoRA dropout, or None when no slot has any.
    """

    batch: LoRABatch
    slots: tuple[int, ...]
    slot_index: Tensor
    dropout_p: Optional[Tensor]

    @classmethod
    def from_sequences(cls, seq_slots: Sequence[int], seq_len: int, dropout_p: Optional[Sequence[float]] = None,
                       device=None) -> Optional["StepBatch"]:
        """For a [B, seq_len] batch whose sequence b uses layer slot seq_slots[b] (-1: none); dropout_p[s] is
        slot s's LoRA dropout (None: no dropout). None when no sequence uses a slot (the base model runs)."""
        slots = tuple(sorted({int(s) for s in seq_slots if s >= 0}))
        if not slots:
            return None
        compact = {s: j for j, s in enumerate(slots)}
        ids = [compact.get(int(s), -1) for s in seq_slots]
        # Ids come from `compact`: valid by construction, so nothing is read back from the device.
        batch = LoRABatch.from_sequences(ids, seq_len, len(slots), device=device, check=False)
        ps = [float(dropout_p[s]) for s in slots] if dropout_p is not None else [0.0] * len(slots)
        drop = torch.tensor(ps, dtype=torch.float64, device=batch.device) if any(ps) else None
        return cls(batch, slots, torch.tensor(slots, dtype=torch.int64, device=batch.device), drop)


class BatchContext:
    """The batch of the current forward step (a LoRABatch over all slots, or a StepBatch), shared by every
    MultiLoRALinear of one model."""

    def __init__(self) -> None:
        self.batch: Optional[Union[LoRABatch, StepBatch]] = None


class MultiLoRALinear(nn.Module):
    """``y[t] = base_layer(x[t]) + scalings[l] · (x[t] A_lᵀ) B_lᵀ`` with l the slot of token t (-1: none).

    Slot buffers (not parameters; they follow ``.to()`` and are left out of ``state_dict``):
    ``lora_A_<i>``: [max_loras, max_rank, in], ``lora_B_<i>``: [max_loras, out_i, max_rank] for each output
    slice i (one slice unless ``output_slices`` splits a fused projection, e.g. QKV widths), ``scalings``:
    [max_loras] float32, ``ranks``: [max_loras] int32 (0 = empty slot: its tokens get the base output).
    Rows/columns past a slot's rank are kept zero.

    ``forward(x, batch)``: x [..., in] with batch.num_tokens = x.numel() / in; without a batch it uses
    ``context.batch`` (set once per step by `lora_kernels.serving.MultiLoRAModel`), and with neither it
    is the base layer. A `LoRABatch` (over all ``max_loras`` slots) runs the slot buffers: inference, no
    gradients reach them.

    Training: `add_trainable(slot, A, B, scaling)` gives a slot leaf parameters ``train_A["<slot>_<i>"]``
    [r_i, in] and ``train_B["<slot>_<i>"]`` [out_i, r_i] (in the slot buffers' dtype). A `StepBatch` runs
    only the slots it lists: each call stacks their weights -- the parameters of trainable slots (so autograd
    reaches them), the buffers of the others -- zero-padded to the largest rank among them, into the
    [L', R, in] / [L', out_i, R] stacks of `multi_lora_linear`, with the slots' LoRA dropout while
    ``self.training``. A trainable slot absent from the step is not in the graph: its parameters get no
    gradient (grad stays None). `sync_trainable(slot)` copies the parameters into the slot buffers, which is
    how a trained adapter is served.
    """

    def __init__(self, base_layer: nn.Linear, max_loras: int, max_rank: int,
                 output_slices: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None, context: Optional[BatchContext] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        for name, v in (("max_loras", max_loras), ("max_rank", max_rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        slices = tuple(output_slices) if output_slices is not None else (self.out_features,)
        if any(not isinstance(n, int) or n < 1 for n in slices) or sum(slices) != self.out_features:
            raise ValueError(f"output_slices must be positive ints summing to out_features={self.out_features}, "
                             f"got {list(slices)}")
        self.output_slices = slices
        self.max_loras, self.max_rank = max_loras, max_rank
        self.backend = backend
        self.context = context if context is not None else BatchContext()
        w = base_layer.weight
        dtype = dtype or w.dtype
        for i, n in enumerate(slices):
            self.register_buffer(f"lora_A_{i}", torch.zeros(max_loras, max_rank, self.in_features, dtype=dtype,
                                                            device=w.device), persistent=False)
            self.register_buffer(f"lora_B_{i}", torch.zeros(max_loras, n, max_rank, dtype=dtype, device=w.device),
                                 persistent=False)
        self.register_buffer("scalings", torch.zeros(max_loras, dtype=torch.float32, device=w.device),
                             persistent=False)
        self.register_buffer("ranks", torch.zeros(max_loras, dtype=torch.int32, device=w.device), persistent=False)
        self._host_ranks = [0] * max_loras  # ranks[] on the host: a StepBatch's padded rank without a device read
        self.train_A = nn.ParameterDict()
        self.train_B = nn.ParameterDict()
        self.training = base_layer.training

    @property
    def A_stacks(self) -> list[Tensor]:
        return [getattr(self, f"lora_A_{i}") for i in range(len(self.output_slices))]

    @property
    def B_stacks(self) -> list[Tensor]:
        return [getattr(self, f"lora_B_{i}") for i in range(len(self.output_slices))]

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.max_loras:
            raise IndexError(f"slot must be an int in [0, max_loras={self.max_loras}), got {slot!r}")

    def _check_adapter(self, slot: int, lora_A, lora_B, scaling) -> tuple[list, list, float, int]:
        """(A per slice, B per slice, scaling, rank) of one adapter, validated (see set_slot)."""
        self._check_slot(slot)
        try:
            s = float(scaling)
        except (TypeError, ValueError):
            s = math.nan
        # The slot keeps it in float32: a value past float32's range would turn the slot's tokens to inf.
        if isinstance(scaling, (bool, str, bytes)) or not abs(s) <= torch.finfo(torch.float32).max:
            raise ValueError(f"scaling must be a finite float (within float32's range), got {scaling!r}")
        ns = len(self.output_slices)
        As = [lora_A] if isinstance(lora_A, Tensor) else list(lora_A)
        Bs = [lora_B] if isinstance(lora_B, Tensor) else list(lora_B)
        if len(As) != ns or len(Bs) != ns:
            raise ValueError(f"this layer has {ns} output slice(s): pass {ns} lora_A and lora_B entries, got "
                             f"{len(As)} and {len(Bs)}")
        rank = 0
        for i, (A, B, n) in enumerate(zip(As, Bs, self.output_slices)):
            if (A is None) != (B is None):
                raise ValueError(f"slice {i}: lora_A and lora_B must both be given or both be None")
            if A is None:
                continue
            if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[1] != self.in_features or A.shape[0] < 1:
                raise ValueError(f"lora_A must have shape [r, in={self.in_features}], got "
                                 f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
            r = A.shape[0]
            if r > self.max_rank:
                raise ValueError(f"adapter rank r={r} exceeds max_rank={self.max_rank}")
            if not isinstance(B, Tensor) or tuple(B.shape) != (n, r):
                raise ValueError(f"lora_B must have shape [out={n}, r={r}], got "
                                 f"{tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__}")
            rank = max(rank, r)
        return As, Bs, s, rank

    @torch.no_grad()
    def _write_slot(self, slot: int, As: list, Bs: list, scaling: float, rank: int) -> None:
        for i, (A, B) in enumerate(zip(As, Bs)):
            a, b = self.A_stacks[i][slot], self.B_stacks[i][slot]
            a.zero_()
            b.zero_()
            if A is not None:
                a[:A.shape[0]].copy_(A)
                b[:, :B.shape[1]].copy_(B)
        self.scalings[slot] = scaling
        self.ranks[slot] = rank
        self._host_ranks[slot] = rank

    def _drop_trainable(self, slot: int) -> None:
        for i in range(len(self.output_slices)):
            for d in (self.train_A, self.train_B):
                if f"{slot}_{i}" in d:
                    del d[f"{slot}_{i}"]

    @torch.no_grad()
    def set_slot(self, slot: int, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                 lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float) -> None:
        """Copy one adapter into `slot`: lora_A [r, in], lora_B [out, r] (PEFT layout), scaling = alpha / r.

        For a layer with several output slices, lora_A / lora_B are lists with one entry per slice
        (None for a slice the adapter does not touch); slices may have different ranks. Checks everything
        before writing, so a bad adapter leaves the slot as it was. A trainable slot loses its parameters.
        """
        As, Bs, s, rank = self._check_adapter(slot, lora_A, lora_B, scaling)
        self._drop_trainable(slot)
        self._write_slot(slot, As, Bs, s, rank)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empty `slot` (and drop its trainable parameters): its tokens get the base output and cost no LoRA
        work."""
        self._check_slot(slot)
        self._drop_trainable(slot)
        for a, b in zip(self.A_stacks, self.B_stacks):
            a[slot].zero_()
            b[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0
        self._host_ranks[slot] = 0

    @torch.no_grad()
    def add_trainable(self, slot: int, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                      lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float) -> list[nn.Parameter]:
        """Make `slot` trainable, starting from lora_A / lora_B (as in set_slot): new leaf parameters
        ``train_A["<slot>_<i>"]`` [r_i, in] and ``train_B["<slot>_<i>"]`` [out_i, r_i] for each slice the
        adapter touches, in the slot buffers' dtype, and the same values in the slot buffers. Returns the new
        parameters (A, B per slice). A `StepBatch` that lists the slot trains them; see `sync_trainable`."""
        As, Bs, s, rank = self._check_adapter(slot, lora_A, lora_B, scaling)
        self._drop_trainable(slot)
        self._write_slot(slot, As, Bs, s, rank)
        params = []
        for i, (A, B) in enumerate(zip(As, Bs)):
            if A is None:
                continue
            dt, dev = self.lora_A_0.dtype, self.lora_A_0.device
            self.train_A[f"{slot}_{i}"] = nn.Parameter(A.detach().to(dev, dt, copy=True))
            self.train_B[f"{slot}_{i}"] = nn.Parameter(B.detach().to(dev, dt, copy=True))
            params += [self.train_A[f"{slot}_{i}"], self.train_B[f"{slot}_{i}"]]
        return params

    def _trainable(self, slots: Sequence[int]) -> tuple[list[list], list[list]]:
        """[slice i][j] -> the A (and B) parameter of slots[j] in slice i, None where it has none."""
        A_out, B_out = [], []
        for i in range(len(self.output_slices)):
            keys = [f"{s}_{i}" for s in slots]
            A_out.append([self.train_A[k] if k in self.train_A else None for k in keys])
            B_out.append([self.train_B[k] if k in self.train_B else None for k in keys])
        return A_out, B_out

    def trainable_weights(self, slot: int) -> tuple[list[Optional[nn.Parameter]], list[Optional[nn.Parameter]]]:
        """`slot`'s parameters (A per slice, B per slice; None for a slice it does not touch); all None when
        the slot is not trainable in this layer."""
        As, Bs = self._trainable([slot])
        return [a[0] for a in As], [b[0] for b in Bs]

    def trainable_parameters(self, slot: int) -> list[nn.Parameter]:
        """`slot`'s parameters in this layer: A and B of each slice it touches (empty when not trainable)."""
        As, Bs = self.trainable_weights(slot)
        return [p for A, B in zip(As, Bs) if A is not None for p in (A, B)]

    @torch.no_grad()
    def sync_trainable(self, slot: int) -> None:
        """Copy `slot`'s parameters into its buffers (the serving path then runs their current values)."""
        As, Bs = self.trainable_weights(slot)
        if any(A is not None for A in As):
            self._write_slot(slot, As, Bs, float(self.scalings[slot]), self._host_ranks[slot])

    def _check_call(self, x: Tensor, batch: LoRABatch) -> None:
        """x and the batch: the only arguments that change per step, checked first on every call."""
        if not isinstance(batch, LoRABatch) or batch.num_slots != self.max_loras:
            got = (f"a LoRABatch over {batch.num_slots} slots" if isinstance(batch, LoRABatch)
                   else type(batch).__name__)
            raise ValueError(f"batch must be a LoRABatch over max_loras={self.max_loras} slots or a StepBatch, "
                             f"got {got}")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features \
                or x.numel() != batch.num_tokens * self.in_features or batch.device != x.device:
            got = f"{tuple(x.shape)} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [..., in={self.in_features}] with batch.num_tokens="
                             f"{batch.num_tokens} tokens on {batch.device}, got {got}")

    def forward(self, x: Tensor, batch: Optional[Union[LoRABatch, StepBatch]] = None) -> Tensor:
        batch = batch if batch is not None else self.context.batch
        if batch is None:
            return self.base_layer(x)
        if isinstance(batch, StepBatch):
            return self._forward_step(x, batch)
        self._check_call(x, batch)
        w, bias = self.base_layer.weight, self.base_layer.bias
        # The full argument check costs ~10-20 us of Python, per layer per step. The slot tensors keep
        # their shapes (set_slot copies in place), so after one full check per (dtype, device, backend)
        # only the shapes that change per step -- x and the batch, above -- are checked.
        backend = self.backend
        key = (x.dtype, x.device, backend, w.dtype, w.device, self.lora_A_0.dtype, self.lora_A_0.device)
        if key != self.__dict__.get("_checked_key"):
            out = multi_lora_linear(x, w, bias, self.A_stacks, self.B_stacks, self.scalings, batch, self.ranks,
                                    backend=backend)
            self._checked_key = key
            return out
        y = run_linear(x.reshape(-1, self.in_features), w, bias, self.A_stacks, self.B_stacks, self.scalings,
                       batch.op_args(), self.ranks, backend)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_step(self, x: Tensor, step: StepBatch) -> Tensor:
        """The training path: stacks of only the step's slots (see the class docstring)."""
        for s in step.slots:
            self._check_slot(s)
        R = max(self._host_ranks[s] for s in step.slots)
        if R == 0:  # none of the step's adapters touches this layer
            return self.base_layer(x)
        A_stacks, B_stacks = [], []
        trainable_A, trainable_B = self._trainable(step.slots)
        for i, n in enumerate(self.output_slices):
            As, Bs = [], []
            for s, A, B in zip(step.slots, trainable_A[i], trainable_B[i]):
                if A is not None:  # parameters, zero-padded to R: F.pad is differentiable
                    r = A.shape[0]
                    As.append(A if r == R else F.pad(A, (0, 0, 0, R - r)))
                    Bs.append(B if r == R else F.pad(B, (0, R - r)))
                else:  # a served adapter (or an empty slice): its buffers, zero past its rank
                    As.append(self.A_stacks[i][s, :R])
                    Bs.append(self.B_stacks[i][s, :, :R])
            A_stacks.append(torch.stack(As))
            B_stacks.append(torch.stack(Bs))
        idx = step.slot_index
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, A_stacks, B_stacks,
                                 self.scalings.index_select(0, idx), step.batch, self.ranks.index_select(0, idx),
                                 backend=self.backend, dropout_p=step.dropout_p, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}, output_slices={list(self.output_slices)}, backend={self.backend}")
