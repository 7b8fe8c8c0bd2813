"""`MultiLoRALinear`: a frozen nn.Linear plus `max_loras` adapter slots, one adapter per token, for serving
(slot buffers) and for training many adapters in one batch (per-slot parameters, `StepBatch`). A slot may hold
a DoRA adapter: the LoRA op's output rescaled per token by its slot's column scale g (see the class). The base
may be a bitsandbytes 4-bit / 8-bit layer (QLoRA): its weight is read as a `lora_kernels.quant.QuantWeight`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_kernels import quant
from lora_kernels.derived_cache import cache_get, cache_put, contents_key
from lora_kernels.ops import dora as _dora
from lora_kernels.ops.batch import LoRABatch, StepDropout
from lora_kernels.ops.multi_lora import (dropout_args, dropped_input, multi_lora_linear, quant_base_linear,
                                         run_linear, run_quant_linear)
from lora_kernels.ops.plumbing import lora_dtype


@dataclass(frozen=True)
class StepBatch:
    """One training step's batch over only the slots it uses: `batch` is a LoRABatch over L' = len(slots)
    compact slots, and compact slot j is layer slot ``slots[j]``. Build it once per step, outside any
    compiled region (`from_sequences` reads its ids on the host), and share it across layers.

    slots:      the layer slots present, ascending (host ints).
    slot_index: [L'] int64 on the batch's device, `slots` as a tensor (gathers the slots' scalings / ranks).
    dropout_p:  the step's per-slot LoRA dropout over the L' slots (`StepDropout`: host rates and the device
                vectors the kernels take, made here once, so no layer reads them back), or None when no slot
                has any.
    """

    batch: LoRABatch
    slots: tuple[int, ...]
    slot_index: Tensor
    dropout_p: Optional[StepDropout]

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
        return cls(batch, slots, torch.tensor(slots, dtype=torch.int64, device=batch.device),
                   StepDropout.build(ps, batch.device))


class BatchContext:
    """The batch of the current forward step (a LoRABatch over all slots, or a StepBatch), shared by every
    MultiLoRALinear of one model, and `slots`: the layer slots its tokens use as host ints, when the caller
    knows them (None: unknown). A layer whose DoRA slots are all absent from `slots` skips DoRA's rescale."""

    def __init__(self) -> None:
        self.batch: Optional[Union[LoRABatch, StepBatch]] = None
        self.slots: Optional[frozenset] = None


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

    DoRA slots (``magnitude=`` m [out] in set_slot / add_trainable), PEFT's ``use_dora=True``::

        y[t] = g_l ⊙ (x[t] W0ᵀ + s_l · (x[t] A_lᵀ) B_lᵀ) + b,    g_l = m_l / ‖W0 + s_l · B_l A_l‖_row (detached)

    the norm taken per output slice with that slice's A_i, B_i (‖W0_j‖ for a slice the adapter does not touch).
    ``dora_scale`` [max_loras + 1, out] (buffer, in the LoRA compute dtype promote(W0, slots, float32)) holds
    g_l for DoRA slots and 1 elsewhere; its last row is all ones and is what the -1 tokens index. It is
    computed when a slot is written (set_slot, add_trainable, sync_trainable) with the single-adapter DoRA
    norm (`lora_kernels.ops.dora.dora_weight_norm`), never per step. Served (a LoRABatch), after the grouped
    op: ``y[t] = g[l] ⊙ (y[t] − b) + b`` in the compute dtype, rounded once -- only when a DoRA slot may be in
    the batch (``context.slots``); otherwise nothing extra runs. Training (a StepBatch with a trainable DoRA
    slot, parameter ``train_m["<slot>"]`` [out]): g = m / n with n recomputed each forward from the current A,
    B (gradients reach A, B and m); with LoRA dropout, PEFT's DoRA form
    ``y = (x − x̂) W0ᵀ + b + g ⊙ (x̂ W0ᵀ + s · (x̂ Aᵀ) Bᵀ)`` (rows of plain slots have g = 1: plain LoRA).

    Quantized base (QLoRA): `base_layer` may be a bitsandbytes ``Linear4bit`` (nf4 / fp4, nested absmax or
    not) or ``Linear8bitLt`` (has_fp16_weights=False), moved to its device (quantized). W0 is then
    deq(W0) in x's dtype, bitsandbytes' dequantization bit for bit (`lora_kernels.quant`), read from the
    layer's own tensors (no copy, converted once and cached until the weight changes); the base product runs
    through ops/qlora.py's dequantize / fused base (`multi_lora_linear` with a QuantWeight), never through
    bitsandbytes' matmul, in serving, training and without a batch alike. The slots default to the dtype the
    weight was quantized from (4-bit) or the bias's dtype (8-bit; float32 without a bias). DoRA slots work over
    a quantized base too: the norm ‖deq(W0) + s · B A‖ from W0 dequantized (bit-exact; when a slot is written,
    and once per training step for trainable DoRA slots), the base product as above.
    """

    def __init__(self, base_layer: nn.Module, max_loras: int, max_rank: int,
                 output_slices: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None, context: Optional[BatchContext] = None):
        super().__init__()
        # By class name: bitsandbytes is imported (by quant.from_bnb) only when one of its layers is handed in.
        self.quant_kind = quant.bnb_kind(base_layer) if isinstance(base_layer, nn.Module) else ""
        if not isinstance(base_layer, nn.Linear) and not self.quant_kind:
            raise TypeError(f"base_layer must be an nn.Linear, or a bitsandbytes Linear4bit (nf4 / fp4) or "
                            f"Linear8bitLt (has_fp16_weights=False) layer, got {type(base_layer).__name__}")
        qweight = quant.from_bnb(base_layer) if self.quant_kind else None  # clear errors: not quantized, ...
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
        if qweight is None:
            w_dtype = w.dtype
        else:  # the dtype W0 dequantizes to (4-bit: what it was quantized from); 8-bit: the bias's, else float32
            bias = base_layer.bias
            w_dtype = qweight.fmt.dtype if qweight.fmt.is_4bit or bias is None else bias.dtype
        dtype = dtype or w_dtype
        for i, n in enumerate(slices):
            self.register_buffer(f"lora_A_{i}", torch.zeros(max_loras, max_rank, self.in_features, dtype=dtype,
                                                            device=w.device), persistent=False)
            self.register_buffer(f"lora_B_{i}", torch.zeros(max_loras, n, max_rank, dtype=dtype, device=w.device),
                                 persistent=False)
        self.register_buffer("scalings", torch.zeros(max_loras, dtype=torch.float32, device=w.device),
                             persistent=False)
        self.register_buffer("ranks", torch.zeros(max_loras, dtype=torch.int32, device=w.device), persistent=False)
        self._host_ranks = [0] * max_loras  # ranks[] on the host: a StepBatch's padded rank without a device read
        self._host_scalings = [0.0] * max_loras  # scalings[] on the host: DoRA's training norm without a read
        ct = lora_dtype(w_dtype, dtype)  # DoRA's column scales: the LoRA compute dtype
        self.register_buffer("dora_scale", torch.ones(max_loras + 1, self.out_features, dtype=ct, device=w.device),
                             persistent=False)
        self._dora_slots: set[int] = set()  # the slots holding a DoRA adapter (host)
        self.train_A = nn.ParameterDict()
        self.train_B = nn.ParameterDict()
        self.train_m = nn.ParameterDict()
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

    def _check_adapter(self, slot: int, lora_A, lora_B, scaling, magnitude=None) -> tuple[list, list, float, int]:
        """(A per slice, B per slice, scaling, rank) of one adapter, validated (see set_slot)."""
        self._check_slot(slot)
        if magnitude is not None and (not isinstance(magnitude, Tensor) or not magnitude.is_floating_point()
                                      or tuple(magnitude.shape) != (self.out_features,)):
            raise ValueError(f"magnitude must be a floating-point tensor of shape [out={self.out_features}], got "
                             f"{tuple(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__}"
                             f"{' ' + str(magnitude.dtype) if isinstance(magnitude, Tensor) else ''}")
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
    def _write_slot(self, slot: int, As: list, Bs: list, scaling: float, rank: int,
                    magnitude: Optional[Tensor] = None) -> None:
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
        self._host_scalings[slot] = scaling
        self._write_dora(slot, magnitude)

    @torch.no_grad()
    def _write_dora(self, slot: int, magnitude: Optional[Tensor]) -> None:
        """Slot `slot`'s row of dora_scale: m / n from the slot's buffers (as served), or 1 (not DoRA)."""
        row = self.dora_scale[slot]
        if magnitude is None:
            row.fill_(1.0)
            self._dora_slots.discard(slot)
            return
        R = self._host_ranks[slot]
        As = [a[slot, :R] if R else None for a in self.A_stacks]
        Bs = [b[slot, :, :R] if R else None for b in self.B_stacks]
        n = self._weight_norm(As, Bs, self._host_scalings[slot])
        row.copy_(magnitude.detach().to(row.device, n.dtype) / n)
        self._dora_slots.add(slot)

    def _dense_weight(self) -> Tensor:
        """W0 [out, in] as DoRA's norm reads it: the nn.Linear's weight, or a quantized base dequantized (bit-exact,
        `qlora.dequantize_base` of the layer's backend) in the compute dtype -- a fresh copy, not kept (keeping
        it would undo the quantization's memory saving): its caller drops it after the norm."""
        if not self.quant_kind:
            return self.base_layer.weight
        from lora_kernels.backends import default_backend
        from lora_kernels.ops import qlora
        qweight = self._weight_bias(self.dora_scale)[0]  # (its checks; the tensor passed sets only b's dtype)
        backend = self.backend if self.backend is not None else default_backend(qweight.device)
        return qlora.dequantize_base(qweight, self.dora_scale.dtype, backend)

    def _weight_sq(self) -> Tensor:
        """‖W0_j‖² [out] in the compute dtype, cached while W0 (its codes and absmax when quantized) is unchanged
        (`derived_cache`: W0 is frozen, a new or changed W0 is recomputed)."""
        w = self._weight_bias(self.dora_scale)[0] if self.quant_kind else self.base_layer.weight
        sources = (w.codes, w.absmax) if self.quant_kind else (w,)
        key = (contents_key(*sources), getattr(w, "fmt", None), self.dora_scale.dtype, self.lora_A_0.dtype)
        cache = self.__dict__.setdefault("_w2", {})
        w2 = cache_get(cache, None, key)
        if w2 is None:
            w2 = cache_put(cache, None, key, _dora.weight_sq(self._dense_weight(), self.lora_A_0), *sources)
        return w2

    def _weight_norm(self, As: Sequence[Optional[Tensor]], Bs: Sequence[Optional[Tensor]], scaling: float,
                     weight: Optional[Tensor] = None) -> Tensor:
        """n = ‖W0 + s · B A‖ per row [out], detached, slice by slice (the single-adapter DoRA norm; a slice
        without A / B: ‖W0_j‖), in the compute dtype. `weight`: W0 as `_dense_weight` gives it, when the caller
        has it (a quantized W0 is dequantized once per step for all its DoRA slots)."""
        w2 = self._weight_sq()
        if all(A is None for A in As):
            return w2.sqrt()
        w = weight if weight is not None else self._dense_weight()
        parts, c = [], 0
        for A, B, n in zip(As, Bs, self.output_slices):
            if A is None:
                parts.append(w2[c:c + n].sqrt())
            else:
                parts.append(_dora.dora_weight_norm(w[c:c + n], A.detach(), B.detach(), scaling,
                                                    weight_sq=w2[c:c + n]))
            c += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def dora_weight_norm(self, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                         lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float) -> Tensor:
        """‖W0 + s · B A‖ per row [out] of an adapter given as in set_slot (taken in the slots' dtype), in the
        compute dtype: DoRA's initial magnitude (PEFT initialises m to it; over a quantized base, of deq(W0))."""
        As, Bs, s, _ = self._check_adapter(0, lora_A, lora_B, scaling)
        dev, dt = self.lora_A_0.device, self.lora_A_0.dtype
        return self._weight_norm([None if A is None else A.to(dev, dt) for A in As],
                                 [None if B is None else B.to(dev, dt) for B in Bs], s)

    def _drop_trainable(self, slot: int) -> None:
        for i in range(len(self.output_slices)):
            for d in (self.train_A, self.train_B):
                if f"{slot}_{i}" in d:
                    del d[f"{slot}_{i}"]
        if str(slot) in self.train_m:
            del self.train_m[str(slot)]

    @torch.no_grad()
    def set_slot(self, slot: int, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                 lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float,
                 magnitude: Optional[Tensor] = None) -> None:
        """Copy one adapter into `slot`: lora_A [r, in], lora_B [out, r] (PEFT layout), scaling = alpha / r,
        magnitude: DoRA's m [out] (PEFT's ``lora_magnitude_vector``), or None for a plain LoRA adapter.

        For a layer with several output slices, lora_A / lora_B are lists with one entry per slice
        (None for a slice the adapter does not touch); slices may have different ranks. Checks everything
        before writing, so a bad adapter leaves the slot as it was. A trainable slot loses its parameters.
        A DoRA slot's column scale g = m / ‖W0 + s · B A‖_row is computed here (see the class docstring).
        """
        As, Bs, s, rank = self._check_adapter(slot, lora_A, lora_B, scaling, magnitude)
        self._drop_trainable(slot)
        self._write_slot(slot, As, Bs, s, rank, magnitude)

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
        self._host_scalings[slot] = 0.0
        self._write_dora(slot, None)

    @torch.no_grad()
    def add_trainable(self, slot: int, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                      lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float,
                      magnitude: Optional[Tensor] = None) -> list[nn.Parameter]:
        """Make `slot` trainable, starting from lora_A / lora_B (as in set_slot): new leaf parameters
        ``train_A["<slot>_<i>"]`` [r_i, in] and ``train_B["<slot>_<i>"]`` [out_i, r_i] for each slice the
        adapter touches, in the slot buffers' dtype, and the same values in the slot buffers; with a DoRA
        `magnitude` [out] also ``train_m["<slot>"]`` [out]. Returns the new parameters (A, B per slice, then m,
        PEFT's order). A `StepBatch` that lists the slot trains them; see `sync_trainable`."""
        As, Bs, s, rank = self._check_adapter(slot, lora_A, lora_B, scaling, magnitude)
        self._drop_trainable(slot)
        self._write_slot(slot, As, Bs, s, rank, magnitude)
        params = []
        for i, (A, B) in enumerate(zip(As, Bs)):
            if A is None:
                continue
            dt, dev = self.lora_A_0.dtype, self.lora_A_0.device
            self.train_A[f"{slot}_{i}"] = nn.Parameter(A.detach().to(dev, dt, copy=True))
            self.train_B[f"{slot}_{i}"] = nn.Parameter(B.detach().to(dev, dt, copy=True))
            params += [self.train_A[f"{slot}_{i}"], self.train_B[f"{slot}_{i}"]]
        if magnitude is not None:
            m = self.train_m[str(slot)] = nn.Parameter(
                magnitude.detach().to(self.lora_A_0.device, self.lora_A_0.dtype, copy=True))
            params.append(m)
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

    def trainable_magnitude(self, slot: int) -> Optional[nn.Parameter]:
        """`slot`'s DoRA magnitude parameter m [out], or None (not trainable, or not DoRA)."""
        key = str(slot)
        return self.train_m[key] if key in self.train_m else None

    def trainable_parameters(self, slot: int) -> list[nn.Parameter]:
        """`slot`'s parameters in this layer: A and B of each slice it touches, then its DoRA magnitude (empty
        when not trainable)."""
        As, Bs = self.trainable_weights(slot)
        m = self.trainable_magnitude(slot)
        return [p for A, B in zip(As, Bs) if A is not None for p in (A, B)] + ([m] if m is not None else [])

    @torch.no_grad()
    def sync_trainable(self, slot: int) -> None:
        """Copy `slot`'s parameters into its buffers (the serving path then runs their current values); a DoRA
        slot's column scale is recomputed from them."""
        As, Bs = self.trainable_weights(slot)
        if any(A is not None for A in As):
            self._write_slot(slot, As, Bs, self._host_scalings[slot], self._host_ranks[slot],
                             self.trainable_magnitude(slot))

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
        slots = None  # the batch's slots on the host, when known: a batch without DoRA slots runs plain LoRA
        if batch is None:
            batch, slots = self.context.batch, self.context.slots
            if batch is None:
                return self._base(x)
        if isinstance(batch, StepBatch):
            return self._forward_step(x, batch)
        dora = self._dora_slots and (slots is None or not self._dora_slots.isdisjoint(slots))
        return self._forward_slots(x, batch, dora)

    def _weight_bias(self, x: Tensor) -> tuple:
        """(W0, b) as the ops take them: the nn.Linear's weight and bias, or for a bitsandbytes base its
        `QuantWeight` (cached until the weight changes) and its bias in x's dtype (bitsandbytes casts it so)."""
        bias = self.base_layer.bias
        if not self.quant_kind:
            return self.base_layer.weight, bias
        qweight = quant.cached_from_bnb(self.__dict__, "_qweight", self.base_layer)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return qweight, bias

    def _base(self, x: Tensor) -> Tensor:
        """The base layer alone: y = x W0ᵀ + b (a quantized W0 through the same base product as the LoRA
        path, never bitsandbytes' own forward)."""
        if not self.quant_kind:
            return self.base_layer(x)
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., in={self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        qweight, bias = self._weight_bias(x)
        y = quant_base_linear(x.reshape(-1, self.in_features), qweight, bias, self.backend)
        return y.view(*x.shape[:-1], self.out_features)

    def _rescale(self, y: Tensor, g: Tensor, bias_in_y: bool) -> Tensor:
        """DoRA's per-token column scale g [T, out] (compute dtype; 1 for rows of plain slots and -1 tokens):
        g ⊙ (y − b) + b (bias_in_y) or g ⊙ y + b, computed in g's dtype and rounded once to y's. The training
        path's (_forward_step); serving hands dora_scale to the op as its col_scale instead (_forward_slots)."""
        y2 = y.reshape(-1, self.out_features)
        yc = y2 if y2.dtype == g.dtype else y2.to(g.dtype)
        bias = self.base_layer.bias
        if bias is None:
            out = yc * g
        else:
            b = bias if bias.dtype == g.dtype else bias.to(g.dtype)
            out = torch.addcmul(b, yc - b if bias_in_y else yc, g)
        return out.to(y.dtype).view(*y.shape[:-1], self.out_features)

    def _forward_slots(self, x: Tensor, batch: LoRABatch, dora: bool = False) -> Tensor:
        """The serving path: the slot buffers, all max_loras slots. dora: a DoRA slot may be in the batch, so
        the op applies dora_scale (g per slot, ones for plain slots and the -1 tokens' last row) as its column
        scale where it writes y: y[t] = g[l_t] ⊙ (x W0ᵀ + s · (x Aᵀ) Bᵀ)[t] + b, no per-token gather."""
        self._check_call(x, batch)
        w, bias = self._weight_bias(x)
        col_scale = self._col_scale(x) if dora else None
        # The full argument check costs ~10-20 us of Python, per layer per step. The slot tensors keep
        # their shapes (set_slot copies in place), so after one full check per (dtype, device, backend)
        # only the shapes that change per step -- x and the batch, above -- are checked. A quantized W0
        # enters the key as its QuantWeight's identity (a new one after the weight changes is checked again).
        backend = self.backend
        wkey = (w.dtype, w.device) if not self.quant_kind else (id(w), None)
        key = (x.dtype, x.device, backend, *wkey, self.lora_A_0.dtype, self.lora_A_0.device,
               None if bias is None else bias.dtype, None if col_scale is None else col_scale.dtype)
        if key != self.__dict__.get("_checked_key"):
            out = multi_lora_linear(x, w, bias, self.A_stacks, self.B_stacks, self.scalings, batch, self.ranks,
                                    backend=backend, col_scale=col_scale)
            self._checked_key = key
            return out
        if self.quant_kind:
            y = run_quant_linear(x.reshape(-1, self.in_features), w, bias, self.A_stacks, self.B_stacks,
                                 self.scalings, batch.op_args(), self.ranks, backend, col_scale=col_scale)
        else:
            y = run_linear(x.reshape(-1, self.in_features), w, bias, self.A_stacks, self.B_stacks, self.scalings,
                           batch.op_args(), self.ranks, backend, col_scale=col_scale)
        return y.view(*x.shape[:-1], self.out_features)

    def _col_scale(self, x: Tensor) -> Tensor:
        """dora_scale as the ops take it: float32 or the LoRA compute dtype (a module cast to half precision
        also casts this buffer; it is then taken back to float32, [max_loras + 1, out] elements)."""
        g = self.dora_scale
        return g if g.dtype in (torch.float32, lora_dtype(x.dtype, self.lora_A_0.dtype)) else g.float()

    def _forward_step(self, x: Tensor, step: StepBatch) -> Tensor:
        """The training path: stacks of only the step's slots (see the class docstring)."""
        for s in step.slots:
            self._check_slot(s)
        R = max(self._host_ranks[s] for s in step.slots)
        if R == 0:  # none of the step's adapters touches this layer
            return self._base(x)
        dora = self._dora_slots and not self._dora_slots.isdisjoint(step.slots)
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
        scalings, ranks = self.scalings.index_select(0, idx), self.ranks.index_select(0, idx)
        w, bias = self._weight_bias(x)
        if not dora:
            return multi_lora_linear(x, w, bias, A_stacks, B_stacks, scalings, step.batch, ranks,
                                     backend=self.backend, dropout_p=step.dropout_p, training=self.training)
        g = self._step_scale(step, trainable_A, trainable_B)[step.batch.token_adapter]
        dropout, seed = dropout_args(step.dropout_p, len(step.slots), x.device, self.training)
        if seed is None:  # y = g ⊙ (x W0ᵀ + s · x Aᵀ Bᵀ) + b
            P = multi_lora_linear(x, w, None, A_stacks, B_stacks, scalings, step.batch, ranks, backend=self.backend)
            return self._rescale(P, g, bias_in_y=False)
        # PEFT's DoRA dropout: y = (x − x̂) W0ᵀ + b + g ⊙ P, P = x̂ W0ᵀ + s · x̂ Aᵀ Bᵀ (x̂ with each slot's rate;
        # rows of plain slots have g = 1, which is plain LoRA's x W0ᵀ + b + s · x̂ Aᵀ Bᵀ).
        x2 = x.reshape(-1, self.in_features)
        x_hat = dropped_input(x2, step.batch.op_args(), dropout, seed)
        P = multi_lora_linear(x_hat, w, None, A_stacks, B_stacks, scalings, step.batch, ranks, backend=self.backend)
        # The remainder's base product: over a quantized W0 by the same dequantize (dx = G deq(W0), W0 dequantized
        # again in the backward, not kept).
        rest = quant_base_linear(x2 - x_hat, w, None, self.backend) if self.quant_kind else F.linear(x2 - x_hat, w)
        y = self._rescale(P, g, bias_in_y=False) + rest
        return y.view(*x.shape[:-1], self.out_features)

    def _step_scale(self, step: StepBatch, trainable_A: list, trainable_B: list) -> Tensor:
        """[L' + 1, out]: g of each of the step's slots (trainable DoRA: m / n with n from the current A, B, so
        m gets a gradient; served DoRA: its dora_scale row; plain: 1), then a row of ones for the -1 tokens."""
        ones = self.dora_scale[-1]
        rows = []
        W = None  # W0 for the norms, dequantized once for all the step's trainable DoRA slots
        for j, s in enumerate(step.slots):
            m = self.trainable_magnitude(s)
            if m is not None:
                As, Bs = [A[j] for A in trainable_A], [B[j] for B in trainable_B]
                if W is None and any(A is not None for A in As):
                    W = self._dense_weight()
                n = self._weight_norm(As, Bs, self._host_scalings[s], W)
                rows.append(m.to(n.dtype) / n)
            else:
                rows.append(self.dora_scale[s] if s in self._dora_slots else ones)
        rows.append(ones)
        return torch.stack(rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}, output_slices={list(self.output_slices)}, backend={self.backend}"
                + (f", base={self.quant_kind}" if self.quant_kind else ""))
