"""`MultiLoRALinear`: a frozen nn.Linear plus `max_loras` adapter slots, one adapter per token."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lora_kernels.backends import resolve_backend
from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear, multi_lora_linear_op


class BatchContext:
    """The LoRABatch of the current forward step, shared by every MultiLoRALinear of one model."""

    def __init__(self) -> None:
        self.batch: Optional[LoRABatch] = None


class MultiLoRALinear(nn.Module):
    """``y[t] = base_layer(x[t]) + scalings[l] · (x[t] A_lᵀ) B_lᵀ`` with l the slot of token t (-1: none).

    Slot buffers (not parameters; they follow ``.to()`` and are left out of ``state_dict``):
    ``lora_A_<i>``: [max_loras, max_rank, in], ``lora_B_<i>``: [max_loras, out_i, max_rank] for each output
    slice i (one slice unless ``output_slices`` splits a fused projection, e.g. QKV widths), ``scalings``:
    [max_loras] float32, ``ranks``: [max_loras] int32 (0 = empty slot: its tokens get the base output).
    Rows/columns past a slot's rank are kept zero.

    ``forward(x, batch)``: x [..., in] with batch.num_tokens = x.numel() / in; without a batch it uses
    ``context.batch`` (set once per step by `lora_kernels.serving.MultiLoRAModel`), and with neither it
    is the base layer. Inference only.
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

    @property
    def A_stacks(self) -> list[Tensor]:
        return [getattr(self, f"lora_A_{i}") for i in range(len(self.output_slices))]

    @property
    def B_stacks(self) -> list[Tensor]:
        return [getattr(self, f"lora_B_{i}") for i in range(len(self.output_slices))]

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.max_loras:
            raise IndexError(f"slot must be an int in [0, max_loras={self.max_loras}), got {slot!r}")

    @torch.no_grad()
    def set_slot(self, slot: int, lora_A: Union[Tensor, Sequence[Optional[Tensor]]],
                 lora_B: Union[Tensor, Sequence[Optional[Tensor]]], scaling: float) -> None:
        """Copy one adapter into `slot`: lora_A [r, in], lora_B [out, r] (PEFT layout), scaling = alpha / r.

        For a layer with several output slices, lora_A / lora_B are lists with one entry per slice
        (None for a slice the adapter does not touch); slices may have different ranks. Checks everything
        before writing, so a bad adapter leaves the slot as it was.
        """
        self._check_slot(slot)
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
        scaling = float(scaling)
        for i, (A, B) in enumerate(zip(As, Bs)):
            a, b = self.A_stacks[i][slot], self.B_stacks[i][slot]
            a.zero_()
            b.zero_()
            if A is not None:
                a[:A.shape[0]].copy_(A)
                b[:, :B.shape[1]].copy_(B)
        self.scalings[slot] = scaling
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Empty `slot`: its tokens get the base output and cost no LoRA work."""
        self._check_slot(slot)
        for a, b in zip(self.A_stacks, self.B_stacks):
            a[slot].zero_()
            b[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0

    def forward(self, x: Tensor, batch: Optional[LoRABatch] = None) -> Tensor:
        batch = batch if batch is not None else self.context.batch
        if batch is None:
            return self.base_layer(x)
        w, bias = self.base_layer.weight, self.base_layer.bias
        # The full argument check costs ~10-20 us of Python, per layer per step. The slot tensors keep
        # their shapes (set_slot copies in place), so after one full check per (dtype, device, backend)
        # only the shapes that change per step -- x and the batch -- are checked.
        backend = resolve_backend(self.backend, x.device)
        key = (x.dtype, x.device, backend, w.dtype, w.device, self.lora_A_0.dtype, self.lora_A_0.device)
        if key != getattr(self, "_checked_key", None):
            out = multi_lora_linear(x, w, bias, self.A_stacks, self.B_stacks, self.scalings, batch, self.ranks,
                                    backend=backend)
            self._checked_key = key
            return out
        if not isinstance(batch, LoRABatch) or batch.num_slots != self.max_loras:
            raise ValueError(f"batch must be a LoRABatch over max_loras={self.max_loras} slots")
        if x.dim() < 1 or x.shape[-1] != self.in_features or x.numel() != batch.num_tokens * self.in_features \
                or batch.device != x.device:
            raise ValueError(f"x must have shape [..., in={self.in_features}] with batch.num_tokens="
                             f"{batch.num_tokens} tokens on {batch.device}, got {tuple(x.shape)} on {x.device}")
        y = multi_lora_linear_op(x.reshape(-1, self.in_features), w, bias, self.A_stacks, self.B_stacks,
                                 self.scalings, *batch.op_args(), self.ranks, backend)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}, output_slices={list(self.output_slices)}, backend={self.backend}")
