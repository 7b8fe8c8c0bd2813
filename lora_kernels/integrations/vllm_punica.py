"""vLLM's punica wrapper on lora_kernels' grouped ops (`lk.lora_shrink` / `lk.lora_expand` over a `lk.LoRABatch`).

vLLM builds this class (see integrations/vllm.py for how it is switched on) and calls it from its LoRA layers.
What each call computes, for the tokens t of a step with slot l = token_lora_indices[t] (vLLM's -1: none)::

    add_lora_linear   y[t, c_i + n] += scale · Σ_j (x[t] · A_i[l, j]) · B_i[l, n, j]   for every slice i
    add_shrink        y[i][t, j]    += scale · x[t] · A_i[l, j]
    add_expand        y[t, c_i + n] += Σ_j x[i][t, j] · B_i[l, n, j]      (c_i = offset_start + Σ_{k<i} out_k)
    add_lora_embedding  y[t, n]     += Σ_j x[t, j] · B[l, n, j]          (x: the A rows vLLM gathered)
    add_lora_logits   as add_lora_linear with one slice, over the rows of the logits (see _logits_batch)

Tokens with l = -1 get nothing added: their rows stay the base layer's output exactly. (vLLM 0.32's CPU torch ops
index the stacks with -1, which selects the last slot: such rows get another request's adapter.)

Layouts: vLLM's stacks are lora_a [L, 1, R, in] and lora_b [L, 1, out, R] (L = max_loras slots, R =
max_lora_rank, ranks below R zero-padded, the adapter's scaling already folded into B when it was loaded), so
``stack[:, 0]`` is our [L, R, in] / [L, out, R] without a copy.

Ranks: vLLM pads every adapter to max_lora_rank with zeros, and a layer an adapter does not target holds zeros
in its slot. Per layer and slot, the effective rank (the last j whose A row and B column are not all zero, + 1)
goes to the ops as `ranks`, so padding is never multiplied and a layer no adapter of the step targets (often
the LM head) costs nothing. It is recomputed when vLLM writes the stacks (their version counter moves).

Per step: `update_metadata` turns vLLM's token -> slot mapping into one LoRABatch (sorted segments and tiles),
reused by every layer of the step. The logits' rows are not the step's tokens: one row per sampled token
(sampler_indices, a second batch built on first use), or, for prompt logprobs, a slice of the step's hidden
states that belongs to one request (a third batch, built from the slice's token range).

Delegated to the platform's own wrapper (vLLM's, built on first use and given the same metadata): fused-MoE LoRA
(add_lora_fused_moe, moe_lora_align_block_size, add_lora_w13, add_lora_w2), apply_lora_full_linear, and any
attribute this class lacks. On CUDA, a model run under torch.compile or CUDA graphs (vLLM's default there) is
left to the platform's wrapper entirely: the batch is rebuilt per step, which graphs would not see; run with
``enforce_eager=True`` to use these kernels on a GPU.

This module imports vLLM: vLLM imports it (by class path) only after `integrations.vllm.install()`.
"""
from __future__ import annotations

import abc
from typing import Any, Optional

import torch
from torch import Tensor
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.utils.import_utils import resolve_obj_by_qualname

import lora_kernels as lk
from lora_kernels.backends import NATIVE
from lora_kernels.integrations import vllm as plugin

# Activation dtypes the native / Triton kernels take (with the stacks in the same dtype); anything else runs the
# "torch" backend of the same ops.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Methods the platform's own wrapper runs (fused-MoE LoRA, request-routed full linear weights).
DELEGATED = ("add_lora_fused_moe", "moe_lora_align_block_size", "add_lora_w13", "add_lora_w2",
             "apply_lora_full_linear")
_OWN = ("update_metadata", "add_shrink", "add_expand", "add_lora_embedding", "add_lora_linear", "add_lora_logits")
_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def _backend(act: Tensor, stack: Tensor) -> Optional[str]:
    """None (the device's fastest) when the kernels take these dtypes, else "torch" (mixed / other dtypes)."""
    return None if act.dtype in _KERNEL_DTYPES and stack.dtype == act.dtype else "torch"


def _native(act: Tensor, stack: Tensor) -> bool:
    return NATIVE is not None and act.is_cpu and act.dtype in _KERNEL_DTYPES and stack.dtype == act.dtype


# On a CPU with the extension built, the registered C++ ops (torch.ops.lora_kernels.native_lora_shrink / _expand,
# which check their arguments in C++) are called directly: lk.lora_shrink / lk.lora_expand check them again in
# Python first, ~25 µs a call, and a decode step makes two calls per adapted layer (measured on the bench's
# decode-heavy workload: ~1 ms of a ~40 ms step on this 2-core CPU). Everywhere else the public ops run.
def _shrink(x: Tensor, A: list, batch: lk.LoRABatch, ranks: Tensor) -> Tensor:
    if _native(x, A[0]):
        return torch.ops.lora_kernels.native_lora_shrink.default(x, A, *batch.op_args(), ranks)
    return lk.lora_shrink(x, A, batch, ranks, backend=_backend(x, A[0]))


def _expand(S: Tensor, B: list, batch: lk.LoRABatch, y: Tensor, scalings: Tensor, ranks: Tensor,
            y_offset: int = 0) -> None:
    if _native(y, B[0]) and S.dtype == torch.float32:
        torch.ops.lora_kernels.native_lora_expand.default(S, B, *batch.op_args(), y, scalings, ranks, y_offset)
    else:
        lk.lora_expand(S, B, batch, y, scalings, ranks, y_offset=y_offset, backend=_backend(y, B[0]))


def _graphs_or_compile() -> bool:
    """Whether vLLM will run this model under torch.compile or CUDA graphs (True when it cannot tell)."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return True
    cc = cfg.compilation_config
    return cc.mode != CompilationMode.NONE or cc.cudagraph_mode != CUDAGraphMode.NONE


class PunicaWrapperLoRAKernels(PunicaWrapperBase):
    """vLLM's punica wrapper interface on `lk.lora_shrink` / `lk.lora_expand` (see the module docstring)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device)
        self._init_args = (max_num_batched_tokens, max_batches, device, kwargs)
        self._fallback = None            # the platform's own wrapper, built on first delegated call
        self._fallback_step = -1         # the step whose metadata the fallback last received
        self._step = 0
        self._meta_args: Optional[tuple] = None
        self._no_lora = True             # no token of this step has an adapter: nothing to add anywhere
        self._batches: dict = {}         # ("tokens" | "sampler" | (start, n), L) -> LoRABatch, for this step
        self._views: dict = {}           # id(vLLM's stack tuple) -> (that tuple, our [L, ...] views)
        self._scalings: dict = {}        # (L, scale) -> [L] float32
        self._ranks: dict = {}           # ids of vLLM's A / B stacks -> (them, versions, [L] int32, list)
        self._used: tuple = ()           # the slots this step's tokens use
        self._layout = 0                 # bumped when vLLM's slot layout changes (see _versions)
        if torch.device(device).type == "cuda" and _graphs_or_compile():
            fb = self._delegate()
            for name in _OWN:  # the platform's wrapper runs everything (see the module docstring)
                setattr(self, name, getattr(fb, name))

    # ------------------------------------------------------------------ per-step metadata

    def update_metadata(self, mapping, lora_index_to_id: list, max_loras: int, vocab_size: int, **kwargs) -> None:
        """vLLM's token / sampler / embedding indices (the base class keeps them), and a new step for our
        batches: they are built on first use, once per step (max_loras here is vLLM's slot count + 1)."""
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = mapping.is_prefill
        self._no_lora = max(mapping.index_mapping, default=0) <= 0  # lora ids are >= 1; 0 = no adapter
        ids = set(mapping.index_mapping)
        self._used = tuple(l for l, i in enumerate(lora_index_to_id) if i is not None and i in ids)
        if self._meta_args is None or self._meta_args[1] != lora_index_to_id:
            self._layout += 1
        self._batches.clear()
        self._step += 1
        self._meta_args = (mapping, list(lora_index_to_id), max_loras, vocab_size, kwargs)

    def _batch(self, key, L: int, ids: Tensor) -> lk.LoRABatch:
        b = self._batches.get((key, L))
        if b is None:
            b = self._batches[(key, L)] = lk.LoRABatch.from_token_adapters(ids, L, check=False)
        return b

    def _token_batch(self, L: int) -> lk.LoRABatch:
        return self._batch("tokens", L, self.token_lora_indices)

    def _logits_batch(self, x: Tensor, L: int) -> lk.LoRABatch:
        """The batch for the logits' rows x [n, H]. vLLM computes logits for the sampled tokens (one row per
        entry of sampler_indices, gathered into a new tensor) and, for prompt logprobs, for a slice
        hidden_states[s : s + n] of one request's tokens: a view into the step's hidden states, whose row s is
        read off the view's storage offset. (vLLM's own CPU path applies sampler_indices to both, which fails
        for the second.)"""
        n, T = x.shape[0], self.indices_len[0]
        row = x.stride(0)
        if row > 0 and x.stride(1) == 1 and x.storage_offset() % row == 0:
            s = x.storage_offset() // row
            rows_in_storage = x.untyped_storage().nbytes() // (row * x.element_size())
            if rows_in_storage > n and s + n <= T:  # a view into more rows: a slice of the step's tokens
                return self._batch((s, n), L, self.token_lora_indices[s:s + n])
        if n == self.indices_len[1]:
            return self._batch("sampler", L, self.sampler_indices)
        if n == T:
            return self._token_batch(L)
        raise RuntimeError(f"lora_kernels' vLLM backend: the logits have {n} rows, which match neither the "
                           f"{self.indices_len[1]} sampled tokens nor a slice of the step's {T} tokens")

    # ------------------------------------------------------------------ weights

    def _stacks(self, stacks) -> list[Tensor]:
        """vLLM's [L, 1, R, in] / [L, 1, out, R] stacks (a tuple, or one tensor) as [L, R, in] / [L, out, R]
        views, cached per tuple (vLLM keeps one per layer and updates it in place)."""
        hit = self._views.get(id(stacks))
        if hit is not None and hit[0] is stacks:
            return hit[1]
        views = [t[:, 0] if t.dim() == 4 else t for t in (stacks if isinstance(stacks, (tuple, list)) else (stacks,))]
        self._views[id(stacks)] = (stacks, views)
        return views

    def _scaling(self, L: int, scale: float, device) -> Tensor:
        t = self._scalings.get((L, scale))
        if t is None:
            t = self._scalings[(L, scale)] = torch.full((L,), float(scale), dtype=torch.float32, device=device)
        return t

    def _versions(self, tensors) -> tuple:
        """What changes when vLLM writes these stacks (set_lora / reset_lora copy into them in place): their
        version counters; for inference tensors, which have none, the slot layout's generation."""
        try:
            return tuple(t._version for t in tensors)
        except RuntimeError:
            return ("layout", self._layout)

    def _layer_ranks(self, a_key, b_key, A: Optional[list], B: Optional[list]) -> tuple[Tensor, bool]:
        """([L] int32 effective ranks of this layer's slots, whether a slot this step uses has one > 0).

        Slot l's rank is 1 + the last j for which some slice has A_i[l, j] and B_i[l, :, j] not all zero (A or B
        alone when only one is given): the terms past it are zero, so the ops skip them."""
        tensors = [t for t in (*(A or ()), *(B or ()))]
        key = (id(a_key), id(b_key))
        versions = self._versions(tensors)
        hit = self._ranks.get(key)
        if hit is None or hit[0] is not a_key or hit[1] is not b_key or hit[2] != versions:
            with torch.no_grad():
                L, R = (A or B)[0].shape[0], (A[0].shape[1] if A else B[0].shape[2])
                nz = torch.zeros(L, R, dtype=torch.bool, device=tensors[0].device)
                for i in range(len(A or B)):
                    rows = (A[i] != 0).any(dim=2) if A else None          # [L, R]
                    cols = (B[i] != 0).any(dim=1) if B else None          # [L, R]
                    nz |= rows & cols if A and B else rows if A else cols
                j = torch.arange(1, R + 1, device=nz.device)
                ranks = (nz * j).amax(dim=1).to(torch.int32)
            hit = self._ranks[key] = (a_key, b_key, versions, ranks, ranks.tolist())
        rl = hit[4]
        return hit[3], any(rl[l] for l in self._used)

    # ------------------------------------------------------------------ the interface vLLM's layers call

    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs) -> None:
        """y[:, slices] += scale · (x A_iᵀ) B_iᵀ per token's slot: one grouped shrink for all slices into
        S [T, NS·R] float32, one grouped expand into y in place (vLLM's `buffer` is not needed)."""
        if not kwargs.get("add_inputs", True):
            y[:, :sum(output_slices)].zero_()
        if self._no_lora:
            return
        A, B = self._stacks(lora_a_stacked), self._stacks(lora_b_stacked)
        ranks, work = self._layer_ranks(lora_a_stacked, lora_b_stacked, A, B)
        if not work:
            return
        L = A[0].shape[0]
        batch = self._token_batch(L)
        _expand(_shrink(x, A, batch, ranks), B, batch, y, self._scaling(L, scale, y.device), ranks)

    def add_shrink(self, y, x: Tensor, lora_a_stacked, scale: float, **kwargs) -> None:
        """y[i] [T, R] += scale · x A_iᵀ per token's slot (vLLM's row-parallel / fully sharded layers, whose
        buffer is reduced across ranks between the shrink and the expand)."""
        if self._no_lora:
            return
        x = x.reshape(-1, x.shape[-1])
        A = self._stacks(lora_a_stacked)
        ranks, work = self._layer_ranks(lora_a_stacked, None, A, None)
        if not work:
            return
        S = _shrink(x, A, self._token_batch(A[0].shape[0]), ranks)
        R = A[0].shape[1]
        for i in range(len(A)):
            y[i].add_(S[:, i * R:(i + 1) * R], alpha=scale)

    def add_expand(self, y: Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs=True,
                   **kwargs) -> None:
        """y[:, c_i : c_i + out_i] += x[i] B_iᵀ per token's slot, c_0 = offset_start (x: [T, R] for one slice,
        or one [T, R] per slice as a tuple or a [NS, T, R] tensor)."""
        if not (add_inputs and kwargs.get("add_input", True)):
            y[:, offset_start:offset_start + sum(output_slices)].zero_()
        if self._no_lora:
            return
        B = self._stacks(lora_b_stacked)
        ranks, work = self._layer_ranks(None, lora_b_stacked, None, B)
        if not work:
            return
        L = B[0].shape[0]
        if isinstance(x, Tensor) and x.dim() == 2:
            S = x
        else:
            S = x[0] if len(B) == 1 else torch.cat([x[i] for i in range(len(B))], dim=1)
        y2 = y.view(-1, y.shape[-1])
        _expand(S.float(), B, self._token_batch(L), y2, self._scaling(L, 1.0, y.device), ranks, offset_start)

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor, add_inputs: bool = True,
                           **kwargs) -> None:
        """y += x Bᵀ per token's slot, the expand alone: x [T, R] are the A rows vLLM gathered (slot 0's for a
        token without an adapter: the expand leaves that row alone)."""
        self.add_expand(y, x, lora_b_stacked, (y.shape[-1],), 0, add_inputs, **kwargs)

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale,
                        *, buffer=None, **kwargs) -> None:
        """logits y [n, V] += scale · (x Aᵀ) Bᵀ per row's slot (which rows: see _logits_batch)."""
        if self._no_lora:
            return
        x = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        A, B = self._stacks(lora_a_stacked), self._stacks(lora_b_stacked)
        ranks, work = self._layer_ranks(lora_a_stacked, lora_b_stacked, A, B)
        if not work:  # the usual case: no adapter of the step adapts the LM head
            return
        L = A[0].shape[0]
        batch = self._logits_batch(x, L)
        _expand(_shrink(x, A, batch, ranks), B, batch, y2, self._scaling(L, scale, y.device), ranks)

    # ------------------------------------------------------------------ what the platform's wrapper runs

    def _delegate(self):
        """The platform's own wrapper, holding this step's metadata."""
        if self._fallback is None:
            path = plugin.original_wrapper() or _CPU_WRAPPER
            tokens, batches, device, kwargs = self._init_args
            self._fallback = resolve_obj_by_qualname(path)(tokens, max_batches=batches, device=device, **kwargs)
        if self._fallback_step != self._step and self._meta_args is not None:
            mapping, ids, max_loras, vocab, kwargs = self._meta_args
            self._fallback.update_metadata(mapping, ids, max_loras, vocab, **kwargs)
            self._fallback_step = self._step
        return self._fallback

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this object lacks (e.g. the GPU wrapper's token_mapping_meta, read by
        # vLLM's MoE expert-parallel code).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._delegate(), name)


def _delegating(name: str):
    def method(self, *args, **kwargs):
        return getattr(self._delegate(), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Runs the platform's own punica wrapper's `{name}` (not covered by lora_kernels)."
    return method


for _name in DELEGATED:
    setattr(PunicaWrapperLoRAKernels, _name, _delegating(_name))
abc.update_abstractmethods(PunicaWrapperLoRAKernels)  # apply_lora_full_linear is abstract in vLLM's base
