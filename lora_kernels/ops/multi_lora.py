"""Multi-adapter LoRA ops: one batch, one adapter slot per token (Punica SGMV/BGMV, S-LoRA), for serving
and for training many adapters at once.

Semantics (PEFT layout per slot; L slots, padded rank R, NS output slices)::

    A_stacks[i]: [L, R, in]      B_stacks[i]: [L, out_i, R]      scalings: [L] float32
    ranks: [L] int32 or None (None: R for every slot). Slot l uses rows/columns [0, r_l) of its A/B, with
        r_l = clamp(ranks[l], 0, R); what lies beyond r_l is never read into the result (padding need not be
        zero). r_l = 0 means "slot l has no adapter in this layer": its tokens get the base output only.
    token_adapter: [T] int, the slot of each token, -1 = no adapter.

    S[t, i·R + j] = x[t] · A_i[l, j]                        for j < r_l, l = token_adapter[t] >= 0; else 0
    y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j]      (c_i = y_offset + Σ_{k<i} out_k)
    multi_lora_linear: y = x W0ᵀ + b + the expand above, with W0 = [Σ out_i, in] and y_offset = 0.

`-1` tokens and slots without tokens do no LoRA work in the "triton" backend.

Training (`multi_lora_linear` only; lora_shrink / lora_expand have no gradients). Per-slot LoRA dropout
p_l in [0, 1) (dropout: [L]): x̂[t] = x[t] ⊙ m[t] / (1 - p_l) with m the keep-mask of `lora_kernels.dropout`
for x viewed as [T, in] (element (t, k), the counter lora_linear uses; threshold from p_l of t's slot),
regenerated from one seed per call, never stored; the forward above uses S = x̂ Aᵀ. With G = dy [T, Σ out_i],
for a token t of slot l = token_adapter[t] >= 0, s_l = scalings[l], j < r_l::

    dS[t, i·R + j] = s_l · Σ_n G[t, c_i + n] B_i[l, n, j]                          dS: [T, NS·R]
    dB_i[l, n, j]  = s_l · Σ_{t of l} G[t, c_i + n] S[t, i·R + j]                  dB_i: [L, out_i, R]
    dA_i[l, j, k]  = Σ_{t of l} dS[t, i·R + j] x̂[t, k]                             dA_i: [L, R, in]
    dx[t]          = G[t] W0 + (Σ_i Σ_{j<r_l} dS[t, i·R + j] A_i[l, j]) ⊙ m[t] / (1 - p_l)    dx: [T, in]

Rows past r_l of A_i and columns past r_l of B_i get zero gradient, and so do slots with no tokens; a -1
token contributes nothing to dA / dB and gets dx[t] = G[t] W0. W0 and b are frozen (no gradient). The
backward saves x, S [T, NS·R], the seed and the weights -- never x̂ or the mask.

Every backend implements (IMPLS) the forward and the backward with the registered ops' arguments (the seven
LoRABatch tensors as one tuple `bt`; dropout: [L] float64 or None, active iff seed is given)::

    fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed) -> (y, S)
    bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
        -> (dx, [dA_i], [dB_i]) each in its tensor's dtype, None when not needed.

The eager path checks the arguments once and calls the implementations directly: bare without autograd
(the inference path), under a plain autograd.Function when a gradient is needed. torch.compile and the
profiler go through the registered ops instead (as in ops/lora_linear.py).

Registered ops (schemas exactly as `torch.library.custom_op` infers them; the C++ extension registers
`lora_kernels::native_<op>` with the same arguments minus `backend`, and `backend="native"` calls it).
The seven LoRABatch tensors are passed in this order everywhere (see `LoRABatch` for their meaning)::

    lora_kernels::lora_shrink(Tensor x, Tensor[] A_stacks, Tensor token_adapter, Tensor sorted_token_ids,
        Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end,
        Tensor? ranks, str backend) -> Tensor
    lora_kernels::lora_expand(Tensor S, Tensor[] B_stacks, Tensor token_adapter, Tensor sorted_token_ids,
        Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end,
        Tensor(a9!) y, Tensor scalings, Tensor? ranks, SymInt y_offset, str backend) -> ()
    lora_kernels::multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] A_stacks,
        Tensor[] B_stacks, Tensor scalings, Tensor token_adapter, Tensor sorted_token_ids, Tensor seg_starts,
        Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end, Tensor? ranks,
        str backend) -> Tensor                                                   (inference: no autograd)
    lora_kernels::multi_lora_linear_fwd(<multi_lora_linear's arguments up to ranks>, Tensor? dropout,
        Tensor? seed, str backend) -> (Tensor y, Tensor S)                        (autograd: the bwd op)
    lora_kernels::multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor[] A_stacks,
        Tensor[] B_stacks, Tensor S, Tensor scalings, <the seven LoRABatch tensors>, Tensor? ranks,
        Tensor? dropout, Tensor? seed, bool need_dx, bool need_dA, bool need_dB, str backend)
        -> (Tensor dx, Tensor[] dA_stacks, Tensor[] dB_stacks)   (not needed: an empty tensor / list)

    x: [T, in] (2-D, any strides); weight: [Σ out_i, in]; bias: [Σ out_i] or None; S: [T, NS·R];
    y: [T, >= y_offset + Σ out_i] (any strides, updated in place); lora_shrink returns S [T, NS·R] float32
    (float64 when x or A is float64, "torch" backend only) and zero where the formula above says 0;
    multi_lora_linear returns y [T, Σ out_i] in x's dtype. All LoRABatch tensors and `ranks` are int32,
    `scalings` float32. "triton"/"native": x in fp16/bf16/fp32 and the A/B stacks in x's dtype.
    backend "auto" = measured dispatch at run time ("fwd" and "bwd" keys of lora_kernels.dispatch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from lora_kernels import dispatch
from lora_kernels.backends import (HAS_TRITON, NATIVE, NATIVE_CUDA, TRITON_INTERPRETED, check_backend,
                                   default_backend, resolve_backend)
from lora_kernels.dropout import keep_threshold, new_seed, philox4x32
from lora_kernels.kernels.tiling import num_tiles, tile_block_m  # noqa: F401 (re-exported)
from lora_kernels.ops.lora_linear import _native_dropout_ok

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_BACKENDS = ("triton", "native", "composite")  # every backend but "torch": kernel dtypes only


def _shape(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


# ----------------------------------------------------------------------------------------------------
# Per-step metadata
# ----------------------------------------------------------------------------------------------------

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

    @property
    def num_tokens(self) -> int:
        return self.token_adapter.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_adapter.device

    def op_args(self) -> tuple[Tensor, ...]:
        """The seven tensors the registered ops take, in schema order."""
        return (self.token_adapter, self.sorted_token_ids, self.seg_starts, self.seg_lens,
                self.tile_slot, self.tile_start, self.tile_end)

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


# ----------------------------------------------------------------------------------------------------
# Argument checks (before any kernel runs)
# ----------------------------------------------------------------------------------------------------

_BATCH_NAMES = ("token_adapter", "sorted_token_ids", "seg_starts", "seg_lens", "tile_slot", "tile_start",
                "tile_end")


def _check_batch(batch_tensors, T: int, L: int, device) -> None:
    ta, sid, ss, sl, tsl, tst, ten = batch_tensors
    NT = num_tiles(T, L)
    want = dict(token_adapter=T, sorted_token_ids=T, seg_starts=L, seg_lens=L, tile_slot=NT, tile_start=NT,
                tile_end=NT)
    for name, t in zip(_BATCH_NAMES, batch_tensors):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != want[name] or t.dtype != torch.int32:
            raise ValueError(f"batch.{name} must be an int32 tensor of shape [{want[name]}] for T={T} tokens and "
                             f"L={L} slots, got {_shape(t)}{'' if not isinstance(t, Tensor) else ' ' + str(t.dtype)}"
                             " (build the batch with LoRABatch.from_token_adapters(token_adapter, num_slots=L))")
        if t.device != device:
            raise ValueError(f"batch.{name} is on {t.device}, the inputs on {device}")


def _check_stacks(name: str, stacks, L: Optional[int], R: Optional[int], in_f: Optional[int]) -> tuple[int, int]:
    """Validate a list of [L, R, in] (A) or [L, out_i, R] (B) stacks; returns (L, R)."""
    if not isinstance(stacks, (list, tuple)) or len(stacks) == 0:
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors, got {type(stacks).__name__}")
    is_a = name.startswith("A")
    for i, t in enumerate(stacks):
        what = f"{name}[{i}]" if len(stacks) > 1 else name
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        layout = "[L, R, in]" if is_a else "[L, out, R]"
        if t.dim() != 3:
            raise ValueError(f"{what} must have shape {layout}, got {_shape(t)}")
        l_, r_ = t.shape[0], (t.shape[1] if is_a else t.shape[2])
        if L is not None and l_ != L:
            raise ValueError(f"{what} must have shape {layout} with L={L} slots, got {_shape(t)}")
        if R is not None and r_ != R:
            raise ValueError(f"{what} must have shape {layout} with R={R}, got {_shape(t)}")
        if r_ < 1:
            raise ValueError(f"{what} must have R >= 1, got {_shape(t)}")
        if is_a and in_f is not None and t.shape[2] != in_f:
            raise ValueError(f"{what} must have shape [L, R, in={in_f}], got {_shape(t)}")
        if not is_a and t.shape[1] < 1:
            raise ValueError(f"{what} must have out >= 1, got {_shape(t)}")
        if t.dtype != stacks[0].dtype:
            raise TypeError(f"all of {name} must share one dtype, got {stacks[0].dtype} and {t.dtype}")
        L, R = l_, r_
        if is_a:
            in_f = t.shape[2]
    return L, R


def _check_common(device, L: int, scalings, ranks, check_scalings: bool) -> None:
    if check_scalings:
        if not isinstance(scalings, Tensor) or scalings.shape != (L,) or not scalings.is_floating_point():
            raise ValueError(f"scalings must be a float tensor of shape [L={L}], got {_shape(scalings)}")
        if scalings.device != device:
            raise ValueError(f"scalings is on {scalings.device}, the inputs on {device}")
    if ranks is not None:
        if not isinstance(ranks, Tensor) or ranks.shape != (L,) or ranks.dtype != torch.int32:
            raise ValueError(f"ranks must be None or an int32 tensor of shape [L={L}], got {_shape(ranks)}"
                             f"{' ' + str(ranks.dtype) if isinstance(ranks, Tensor) else ''}")
        if ranks.device != device:
            raise ValueError(f"ranks is on {ranks.device}, the inputs on {device}")


def _check_devices(named: dict) -> None:
    devs = {n: t.device for n, t in named.items() if isinstance(t, Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError("all inputs must be on one device, got " + ", ".join(f"{n}:{d}" for n, d in devs.items()))


def _check_triton_dtypes(backend: str, act_name: str, act: Tensor, stacks_name: str, stacks) -> None:
    if backend in _KERNEL_BACKENDS:
        if act.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend={backend!r} supports {act_name} of dtype {_TRITON_DTYPES}, got {act.dtype}")
        if stacks[0].dtype != act.dtype:
            raise TypeError(f"backend={backend!r} needs {stacks_name} in {act_name}'s dtype ({act.dtype}), got "
                            f"{stacks[0].dtype}; use backend='torch' for mixed dtypes")


def check_shrink_args(x, A_stacks, batch_tensors, ranks, backend) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x must be a floating-point tensor of shape [T, in], got {_shape(x)}")
    L = batch_tensors[2].shape[0] if isinstance(batch_tensors[2], Tensor) else None
    L, R = _check_stacks("A_stack", A_stacks, L, None, x.shape[1])
    _check_devices({"x": x, **{f"A_stack[{i}]": a for i, a in enumerate(A_stacks)}})
    _check_batch(batch_tensors, x.shape[0], L, x.device)
    _check_common(x.device, L, None, ranks, False)
    _check_triton_dtypes(backend, "x", x, "A_stack", A_stacks)


def check_expand_args(S, B_stacks, batch_tensors, y, scalings, ranks, y_offset, backend) -> None:
    if not isinstance(y, Tensor) or not y.is_floating_point() or y.dim() != 2:
        raise ValueError(f"y must be a floating-point tensor of shape [T, out], got {_shape(y)}")
    L = batch_tensors[2].shape[0] if isinstance(batch_tensors[2], Tensor) else None
    L, R = _check_stacks("B_stack", B_stacks, L, None, None)
    NS = len(B_stacks)
    T = y.shape[0]
    if not isinstance(S, Tensor) or S.shape != (T, NS * R) or S.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"S must be a float32 tensor of shape [T={T}, NS*R={NS * R}] (NS={NS} slices of rank "
                         f"R={R}), got {_shape(S)}{' ' + str(S.dtype) if isinstance(S, Tensor) else ''}")
    if not isinstance(y_offset, int) or y_offset < 0:
        raise ValueError(f"y_offset must be a non-negative int, got {y_offset!r}")
    width = sum(b.shape[1] for b in B_stacks)
    if y.shape[1] < y_offset + width:
        raise ValueError(f"y must have shape [T={T}, >= y_offset + sum(out)={y_offset + width}], got {_shape(y)}")
    _check_devices({"S": S, "y": y, **{f"B_stack[{i}]": b for i, b in enumerate(B_stacks)}})
    _check_batch(batch_tensors, T, L, y.device)
    _check_common(y.device, L, scalings, ranks, True)
    _check_triton_dtypes(backend, "y", y, "B_stack", B_stacks)
    if backend in _KERNEL_BACKENDS and (S.dtype != torch.float32 or scalings.dtype != torch.float32):
        raise TypeError(f"backend={backend!r} needs S and scalings in float32, got {S.dtype}, {scalings.dtype}")


def check_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, batch_tensors, ranks, backend) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x must be a floating-point tensor of shape [T, in], got {_shape(x)}")
    T, in_f = x.shape
    L = batch_tensors[2].shape[0] if isinstance(batch_tensors[2], Tensor) else None
    L, R = _check_stacks("A_stack", A_stacks, L, None, in_f)
    _check_stacks("B_stack", B_stacks, L, R, None)
    if len(A_stacks) != len(B_stacks):
        raise ValueError(f"A_stack and B_stack must have the same number of slices, got {len(A_stacks)} and "
                         f"{len(B_stacks)}")
    out_f = sum(b.shape[1] for b in B_stacks)
    if not isinstance(weight, Tensor) or weight.shape != (out_f, in_f):
        raise ValueError(f"weight must have shape [out=sum(B out)={out_f}, in={in_f}], got {_shape(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_f,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be None or a {x.dtype} tensor of shape [out={out_f}], got {_shape(bias)}")
    _check_devices({"x": x, "weight": weight, "bias": bias, **{f"A_stack[{i}]": a for i, a in enumerate(A_stacks)},
                    **{f"B_stack[{i}]": b for i, b in enumerate(B_stacks)}})
    _check_batch(batch_tensors, T, L, x.device)
    _check_common(x.device, L, scalings, ranks, True)
    if B_stacks[0].dtype != A_stacks[0].dtype:
        raise TypeError(f"A_stack ({A_stacks[0].dtype}) and B_stack ({B_stacks[0].dtype}) must share a dtype")
    _check_triton_dtypes(backend, "x", x, "A_stack", A_stacks)
    if backend in _KERNEL_BACKENDS and scalings.dtype != torch.float32:
        raise TypeError(f"backend={backend!r} needs scalings in float32, got {scalings.dtype}")


# ----------------------------------------------------------------------------------------------------
# Per-slot LoRA dropout: the mask of lora_kernels.dropout for x viewed as [T, in] (element (t, k), the
# counter lora_linear uses), each row thresholded with the p of its token's slot. Regenerated from the
# call's seed wherever it is needed; never stored.
# ----------------------------------------------------------------------------------------------------

def _keep_rows(seed: int, rows: Tensor, K: int, p: float) -> Tensor:
    """Rows `rows` of lk.dropout_mask(seed, (T, K), p) as a [len(rows), K] bool tensor, without the others."""
    K4 = (K + 3) // 4
    counters = rows.view(-1, 1) * K4 + torch.arange(K4, dtype=torch.int64, device=rows.device)
    bits = torch.stack(philox4x32(seed, counters), dim=-1).view(rows.shape[0], K4 * 4)[:, :K]
    return (bits >> 1) >= keep_threshold(p)


class _SlotDropout:
    """One call's dropout over x [T, K]: `scale(l, rows)` is m / (1 - p_l) [len(rows), K] in dtype ct for rows
    of slot l, or None when p_l = 0."""

    def __init__(self, x: Tensor, ct: torch.dtype, dropout: Tensor, seed: Tensor):
        self.shape, self.ct, self.seed, self.ps = tuple(x.shape), ct, seed, dropout.tolist()
        # The extension's vectorised generator makes the scales of all T rows at once (per distinct p), far
        # faster than the int64 Philox of _keep_rows. It rounds 1/(1-p) to float32: float32 only.
        self.full = {} if ct == torch.float32 and _native_dropout_ok(x) else None

    def scale(self, l: int, rows: Tensor) -> Optional[Tensor]:
        p = self.ps[l]
        if p == 0.0:
            return None
        if self.full is not None:
            f = self.full.get(p)
            if f is None:
                ones = torch.ones(self.shape, dtype=self.ct, device=rows.device)
                with _below_autograd():
                    f = self.full[p] = torch.ops.lora_kernels.native_dropout.default(ones, p, self.seed)
            return f.index_select(0, rows)
        return _keep_rows(int(self.seed.item()), rows, self.shape[1], p).to(self.ct) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------------
# Composite PyTorch implementation: the "torch" backend (any device, any float dtype). It walks the
# active segments with one host read of seg_lens (free on CPU; on CUDA use "triton" or "native"): per
# segment, GEMMs over the slot's gathered rows, no per-token work.
# ----------------------------------------------------------------------------------------------------

def _segments(sorted_token_ids, seg_starts, seg_lens, ranks, R):
    starts, lens = seg_starts.tolist(), seg_lens.tolist()
    rks = [R] * len(lens) if ranks is None else [min(max(int(r), 0), R) for r in ranks.tolist()]
    for l, (s, n) in enumerate(zip(starts, lens)):
        if n > 0 and rks[l] > 0:
            yield l, rks[l], sorted_token_ids[s:s + n].long()


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The LoRA path's dtype: promote(a, b, float32) (a, b = x, A or S, B)."""
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def _rows(x: Tensor, toks: Tensor, ct: torch.dtype, drop: Optional[_SlotDropout], l: int) -> Tensor:
    """x̂ rows `toks` (all of slot l) in dtype ct."""
    xs = x.index_select(0, toks).to(ct)
    f = None if drop is None else drop.scale(l, toks)
    return xs if f is None else xs * f


def _torch_shrink(x, A_stacks, batch_tensors, ranks, drop: Optional[_SlotDropout] = None):
    _, sid, ss, sl = batch_tensors[:4]
    R = A_stacks[0].shape[1]
    ct = _compute_dtype(x, A_stacks[0])
    S = torch.zeros(x.shape[0], len(A_stacks) * R, dtype=ct, device=x.device)
    for l, r, toks in _segments(sid, ss, sl, ranks, R):
        xs = _rows(x, toks, ct, drop, l)
        for i, A in enumerate(A_stacks):
            S[toks, i * R:i * R + r] = xs @ A[l, :r].to(ct).T
    return S


def _torch_expand(S, B_stacks, batch_tensors, y, scalings, ranks, y_offset):
    _, sid, ss, sl = batch_tensors[:4]
    R = B_stacks[0].shape[2]
    ct = _compute_dtype(S, B_stacks[0])
    scales = scalings.tolist()
    for l, r, toks in _segments(sid, ss, sl, ranks, R):
        col = y_offset
        for i, B in enumerate(B_stacks):
            n = B.shape[1]
            delta = (S[toks, i * R:i * R + r].to(ct) * scales[l]) @ B[l, :, :r].to(ct).T
            view = y[:, col:col + n]
            # Add in the compute dtype and round once, as the kernels do.
            view.index_copy_(0, toks, (view.index_select(0, toks).to(ct) + delta).to(y.dtype))
            col += n


def torch_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    drop = None if seed is None else _SlotDropout(x, _compute_dtype(x, A_stacks[0]), dropout, seed)
    S = _torch_shrink(x, A_stacks, bt, ranks, drop)
    y = torch.nn.functional.linear(x, weight, bias)
    if y.shape[0] > 0:
        _torch_expand(S, B_stacks, bt, y, scalings, ranks, 0)
    return y, S


def torch_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB):
    """Per active slot l (its gathered rows, G = dy rows, s = s_l, slice i):
    dB_i[l] = s Gᵢᵀ S_i, dS_i = s Gᵢ B_i[l], dA_i[l] = dS_iᵀ x̂, dx rows += (Σ_i dS_i A_i[l]) ⊙ m / (1 - p_l)."""
    _, sid, ss, sl = bt[:4]
    R = A_stacks[0].shape[1]
    ct = _compute_dtype(x, A_stacks[0])
    dA = [torch.zeros(A.shape, dtype=ct, device=A.device) for A in A_stacks] if need_dA else None
    dB = [torch.zeros(B.shape, dtype=ct, device=B.device) for B in B_stacks] if need_dB else None
    dx = torch.mm(dy, weight) if need_dx else None
    if need_dx or need_dA or need_dB:
        drop = None if seed is None else _SlotDropout(x, ct, dropout, seed)
        scales = scalings.tolist()
        for l, r, toks in _segments(sid, ss, sl, ranks, R):
            s = scales[l]
            G = dy.index_select(0, toks).to(ct)
            keep = None if drop is None else drop.scale(l, toks)
            if need_dA:
                xs = x.index_select(0, toks).to(ct)
                xs = xs if keep is None else xs * keep
            if need_dB:
                Ss = S.index_select(0, toks).to(ct)
            lora_dx, col = None, 0
            for i, (A, B) in enumerate(zip(A_stacks, B_stacks)):
                Gi = G[:, col:col + B.shape[1]]
                col += B.shape[1]
                if need_dB:
                    dB[i][l, :, :r] = (Gi.T @ Ss[:, i * R:i * R + r]).mul_(s)
                if need_dA or need_dx:
                    dS = (Gi @ B[l, :, :r].to(ct)).mul_(s)  # [n, r]
                    if need_dA:
                        dA[i][l, :r] = dS.T @ xs
                    if need_dx:
                        Al = A[l, :r].to(ct)
                        lora_dx = dS @ Al if lora_dx is None else lora_dx.addmm_(dS, Al)
            if need_dx:
                if keep is not None:
                    lora_dx.mul_(keep)
                # Add in the compute dtype and round once.
                dx.index_copy_(0, toks, (dx.index_select(0, toks).to(ct) + lora_dx).to(dx.dtype))
    if dA is not None:
        dA = [g.to(A.dtype) for g, A in zip(dA, A_stacks)]
    if dB is not None:
        dB = [g.to(B.dtype) for g, B in zip(dB, B_stacks)]
    return dx, dA, dB


def _torch_linear(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks):
    return torch_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, None, None)[0]


# ----------------------------------------------------------------------------------------------------
# "native", "triton", "composite": thin adapters to the same conventions
# ----------------------------------------------------------------------------------------------------

# The native ops are called below the autograd keys: the eager callers handle autograd themselves, and the
# dispatcher's autograd layer costs µs per call (see ops/lora_linear.py).
_below_autograd = torch._C._AutoDispatchBelowADInplaceOrView
_any_autocast = torch._C._is_any_autocast_enabled


def _native_shrink(x, A_stacks, bt, ranks):
    with _below_autograd():
        return torch.ops.lora_kernels.native_lora_shrink.default(x, A_stacks, *bt, ranks)


def _native_expand(S, B_stacks, bt, y, scalings, ranks, y_offset):
    with _below_autograd():
        torch.ops.lora_kernels.native_lora_expand.default(S, B_stacks, *bt, y, scalings, ranks, y_offset)


def _native_linear(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks):
    with _below_autograd():
        return torch.ops.lora_kernels.native_multi_lora_linear.default(x, weight, bias, A_stacks, B_stacks, scalings,
                                                                       *bt, ranks)


def _kernels():
    from lora_kernels.kernels import multi_lora as k  # imports triton: only when a Triton backend runs
    return k


# Every backend's implementation of the three inference ops, with the registered ops' arguments (the seven
# LoRABatch tensors as one tuple `bt`). "composite" differs from "triton" only for the linear (cuBLAS base GEMM).
SHRINK = {"torch": _torch_shrink, "native": _native_shrink,
          "triton": lambda *a: _kernels().lora_shrink_triton(*a),
          "composite": lambda *a: _kernels().lora_shrink_triton(*a)}
EXPAND = {"torch": _torch_expand, "native": _native_expand,
          "triton": lambda *a: _kernels().lora_expand_triton(*a),
          "composite": lambda *a: _kernels().lora_expand_triton(*a)}
LINEAR = {"torch": _torch_linear, "native": _native_linear,
          "triton": lambda *a: _kernels().multi_lora_linear_triton(*a),
          "composite": lambda *a: _kernels().multi_lora_linear_composite(*a)}


def _dropped_input(x, bt, ranks, R, dropout, seed) -> Tensor:
    """x̂ [T, in] in x's dtype for the native shrink, which takes no mask (yet): the rows of slots with p > 0
    scaled by m / (1 - p) in float32, every other row x (the shrink skips -1 tokens and rank-0 slots)."""
    _, sid, ss, sl = bt[:4]
    drop = _SlotDropout(x, torch.float32, dropout, seed)
    out = x.clone()
    for l, _, toks in _segments(sid, ss, sl, ranks, R):
        f = drop.scale(l, toks)
        if f is not None:
            out.index_copy_(0, toks, (x.index_select(0, toks).float() * f).to(x.dtype))
    return out


def _kernel_fwd(backend: str) -> Callable:
    """The training forward of the "native" backend: y = x W0ᵀ + b by torch, then the backend's grouped shrink
    of x̂ (built here) into S and its expand into y."""
    def fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
        x_hat = x if seed is None else _dropped_input(x, bt, ranks, A_stacks[0].shape[1], dropout, seed)
        S = SHRINK[backend](x_hat, A_stacks, bt, ranks)
        y = torch.nn.functional.linear(x, weight, bias)
        if y.shape[0] > 0:
            EXPAND[backend](S, B_stacks, bt, y, scalings, ranks, 0)
        return y, S
    return fwd


def _native_train_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    """"native" training forward: on CPU the extension's (x̂ masked as its rows are gathered, never stored); on
    CUDA (no training kernels there) the native shrink / expand of _kernel_fwd."""
    if not x.is_cpu:
        return _native_cuda_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed)
    with _below_autograd():
        return torch.ops.lora_kernels.native_multi_lora_linear_fwd.default(
            x, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, dropout, seed)


def _native_train_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA,
                      need_dB):
    """"native" backward: the extension's per-segment GEMMs on CPU; the torch backward elsewhere (the native op
    has no CUDA kernel)."""
    if not x.is_cpu:
        return torch_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA,
                         need_dB)
    with _below_autograd():
        dx, dA, dB = torch.ops.lora_kernels.native_multi_lora_linear_bwd.default(
            dy, x, weight, A_stacks, B_stacks, S, scalings, *bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
    return dx if need_dx else None, dA if need_dA else None, dB if need_dB else None


_native_cuda_fwd = _kernel_fwd("native")

# fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed) -> (y, S) and
# bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB)
# -> (dx, dA_stacks, dB_stacks) of every backend. "triton" / "composite": the Triton kernels (dropout mask
# regenerated in them; the forward's fused GEMM / cuBLAS + expand, one shared backward). "native": the C++
# training ops on CPU; on CUDA its shrink / expand forward and the torch backward.
IMPLS: dict[str, tuple[Callable, Callable]] = {
    "torch": (torch_fwd, torch_bwd),
    "native": (_native_train_fwd, _native_train_bwd),
    "triton": (lambda *a: _kernels().multi_lora_linear_fwd_triton(*a),
               lambda *a: _kernels().multi_lora_linear_bwd_triton(*a)),
    "composite": (lambda *a: _kernels().multi_lora_linear_fwd_composite(*a),
                  lambda *a: _kernels().multi_lora_linear_bwd_triton(*a)),
}
# Backends with a backward of their own: the "bwd" dispatch's candidates ("native" on CUDA is the torch backward
# under another name: a duplicate candidate there, never a wrong one).
_OWN_BWD = ("torch", "triton", "composite", "native")


# ----------------------------------------------------------------------------------------------------
# backend=None: measured dispatch (lora_kernels/dispatch.py)
# ----------------------------------------------------------------------------------------------------

def _kernel_dtypes(x: Tensor, A_stacks, scalings: Tensor) -> bool:
    """Whether the kernel backends (all but "torch") take these dtypes."""
    return x.dtype in _TRITON_DTYPES and A_stacks[0].dtype == x.dtype and scalings.dtype == torch.float32


def _candidate_names(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return (["composite", "triton"] if HAS_TRITON else ["torch"]) + (["native"] if NATIVE_CUDA else [])
    names = ["torch"] + (["native"] if NATIVE is not None else [])
    if HAS_TRITON and TRITON_INTERPRETED and dispatch.tuning_enabled(device):
        names += ["composite", "triton"]  # interpreted: to exercise the machinery in tests, never the default
    return names


def _key_fields(x: Tensor, weight: Tensor, A_stacks, B_stacks) -> dict:
    return dict(x=str(x.dtype)[6:], m=dispatch.bucket(x.shape[0]), k=weight.shape[1],
                n="+".join(str(b.shape[1]) for b in B_stacks), r=A_stacks[0].shape[1], slots=A_stacks[0].shape[0])


def _fwd_backend(args: tuple, x: Tensor, weight: Tensor, bias, A_stacks, B_stacks) -> str:
    """The backend backend=None runs forward (args: the linear's arguments). One choice for the inference and
    the training forward: they run the same shrink and expand kernels."""
    dev_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    kernels_ok = _kernel_dtypes(x, A_stacks, args[5])
    if dispatch.is_static(dev_type):
        return default_backend(dev_type) if kernels_ok else "torch"
    if not kernels_ok:
        return "torch"
    device = x.device
    # The native CUDA shrink splits K with atomics whatever torch's deterministic flag says.
    cands = [dispatch.Candidate(n, LINEAR[n], deterministic=not (n == "native" and device.type == "cuda"))
             for n in _candidate_names(device)]
    ref = "composite" if device.type == "cuda" and HAS_TRITON else "torch"
    fields = dict(_key_fields(x, weight, A_stacks, B_stacks), bias=int(bias is not None))
    return dispatch.choose("multi_lora_linear", "fwd", fields, device, cands, ref, default_backend(device.type),
                           args, lambda y: (y,), x.dtype).name


def _bwd_outputs(out) -> tuple:
    dx, dA, dB = out
    return (dx, *(dA or ()), *(dB or ()))


def _bwd_backend(args: tuple, x: Tensor, weight: Tensor, A_stacks, B_stacks, scalings: Tensor, dropout,
                 need: tuple) -> str:
    """The backend backend=None runs backward: measured among the backends with a backward of their own."""
    dev_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    kernels_ok = _kernel_dtypes(x, A_stacks, scalings)
    default = default_backend(dev_type)
    default = default if kernels_ok and default in _OWN_BWD else "torch"
    if dispatch.is_static(dev_type):
        return default
    device = x.device
    # The native backward is CPU-only (on CUDA "native" runs the torch backward: not a candidate of its own).
    names = ["torch"] + [n for n in _candidate_names(device) if kernels_ok and n != "torch" and n in _OWN_BWD
                         and not (n == "native" and device.type == "cuda")]
    if len(names) == 1:
        return names[0]
    cands = [dispatch.Candidate(n, IMPLS[n][1]) for n in names]
    fields = dict(_key_fields(x, weight, A_stacks, B_stacks), drop=int(dropout is not None),
                  need="".join("1" if n else "0" for n in need))
    return dispatch.choose("multi_lora_linear", "bwd", fields, device, cands, "torch", default, args,
                           _bwd_outputs, x.dtype).name


def _run(phase: int, backend: Optional[str], args: tuple, need: tuple = ()):
    """IMPLS[backend][phase](*args); backend None / "auto" = measured dispatch."""
    x = args[0] if phase == 0 else args[1]
    if _any_autocast() and torch.is_autocast_enabled(x.device.type):
        # The implementations pick their own dtypes: autocast must not recast their inner ops (a registered op
        # is opaque to autocast; the eager path has to say so).
        with torch.autocast(x.device.type, enabled=False):
            return _run(phase, backend, args, need)
    if backend is None or backend == "auto":
        if phase == 0:
            x, weight, bias, A_stacks, B_stacks = args[:5]
            backend = _fwd_backend(args[:8], x, weight, bias, A_stacks, B_stacks)
        else:
            _, x, weight, A_stacks, B_stacks, _, scalings, _, _, dropout = args[:10]
            backend = _bwd_backend(args, x, weight, A_stacks, B_stacks, scalings, dropout, need)
    return IMPLS[backend][phase](*args)


def _run_fwd(backend, x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    return _run(0, backend, (x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed))


def _run_bwd(backend, dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed,
             need_dx, need_dA, need_dB):
    return _run(1, backend, (dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed,
                             need_dx, need_dA, need_dB), (need_dx, need_dA, need_dB))


# ----------------------------------------------------------------------------------------------------
# Registered ops: what torch.compile, opcheck and the profiler see
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def lora_shrink_op(x: Tensor, A_stacks: list[Tensor], token_adapter: Tensor, sorted_token_ids: Tensor,
                   seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_end: Tensor,
                   ranks: Optional[Tensor], backend: str) -> Tensor:
    """S [T, NS·R]: S[t, i·R + j] = x[t] · A_i[l, j] for j < r_l, l = token_adapter[t] >= 0; else 0."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    return SHRINK[backend](x, list(A_stacks), bt, ranks)


@lora_shrink_op.register_fake
def _(x, A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
      ranks, backend):
    dt = torch.float64 if torch.float64 in (x.dtype, A_stacks[0].dtype) else torch.float32
    return x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=dt)


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def lora_expand_op(S: Tensor, B_stacks: list[Tensor], token_adapter: Tensor, sorted_token_ids: Tensor,
                   seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_end: Tensor,
                   y: Tensor, scalings: Tensor, ranks: Optional[Tensor], y_offset: int, backend: str) -> None:
    """y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j], in place."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    EXPAND[backend](S, list(B_stacks), bt, y, scalings, ranks, y_offset)


@lora_expand_op.register_fake
def _(S, B_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
      y, scalings, ranks, y_offset, backend):
    return None


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stacks: list[Tensor],
                         B_stacks: list[Tensor], scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                         seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                         tile_end: Tensor, ranks: Optional[Tensor], backend: str) -> Tensor:
    """y [T, out] = x W0ᵀ + b + per-token LoRA (see the module docstring), in x's dtype. Inference (no
    autograd formula; training goes through multi_lora_linear_fwd). backend "auto" = measured dispatch."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    args = (x, weight, bias, list(A_stacks), list(B_stacks), scalings, bt, ranks)
    name = backend if backend != "auto" else _fwd_backend(args, x, weight, bias, args[3], args[4])
    return LINEAR[name](*args)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("lora_kernels::multi_lora_linear_fwd", mutates_args=())
def multi_lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stacks: list[Tensor],
                          B_stacks: list[Tensor], scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                          seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                          tile_end: Tensor, ranks: Optional[Tensor], dropout: Optional[Tensor], seed: Optional[Tensor],
                          backend: str) -> tuple[Tensor, Tensor]:
    """(y [T, out] in x's dtype, S = x̂ Aᵀ [T, NS·R] float32, float64 when x or A is). Dropout is active iff
    `seed` is given. backend "auto" = measured dispatch at run time."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    return _run_fwd(backend, x, weight, bias, list(A_stacks), list(B_stacks), scalings, bt, ranks, dropout, seed)


@multi_lora_linear_fwd.register_fake
def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, dropout, seed, backend):
    s_dtype = torch.float64 if torch.float64 in (x.dtype, A_stacks[0].dtype) else torch.float32
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], len(A_stacks) * A_stacks[0].shape[1], dtype=s_dtype))


@torch.library.custom_op("lora_kernels::multi_lora_linear_bwd", mutates_args=())
def multi_lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, A_stacks: list[Tensor], B_stacks: list[Tensor],
                          S: Tensor, scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                          seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                          tile_end: Tensor, ranks: Optional[Tensor], dropout: Optional[Tensor], seed: Optional[Tensor],
                          need_dx: bool, need_dA: bool, need_dB: bool, backend: str
                          ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(dx [T, in], [dA_i], [dB_i]); a gradient not needed is an empty tensor (dx) or an empty list."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    dx, dA, dB = _run_bwd(backend, dy, x, weight, list(A_stacks), list(B_stacks), S, scalings, bt, ranks, dropout,
                          seed, need_dx, need_dA, need_dB)
    return dx if dx is not None else x.new_empty(0), dA or [], dB or []


@multi_lora_linear_bwd.register_fake
def _(dy, x, weight, A_stacks, B_stacks, S, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, dropout, seed, need_dx, need_dA, need_dB, backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            [a.new_empty(a.shape) for a in A_stacks] if need_dA else [],
            [b.new_empty(b.shape) for b in B_stacks] if need_dB else [])


def _setup_context(ctx, inputs, output):
    x, weight, _, A_stacks, B_stacks, scalings, *bt = inputs[:13]
    ranks, dropout, seed, backend = inputs[13:]
    ctx.save_for_backward(x, weight, output[1], seed, scalings, ranks, dropout, *bt, *A_stacks, *B_stacks)
    ctx.num_slices, ctx.backend = len(A_stacks), backend


def _stack_grads(grads, needs) -> list:
    return [g if n else None for g, n in zip(grads, needs)] if grads else [None] * len(needs)


def _registered_backward(ctx, dy, _dS):
    x, weight, S, seed, scalings, ranks, dropout, *rest = ctx.saved_tensors
    ns = ctx.num_slices
    bt, A_stacks, B_stacks = rest[:7], rest[7:7 + ns], rest[7 + ns:]
    needs = ctx.needs_input_grad  # lists for the stack arguments
    need_dx, need_dA, need_dB = needs[0], any(needs[3]), any(needs[4])
    dx = dA = dB = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = multi_lora_linear_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, *bt, ranks, dropout, seed,
                                           need_dx, need_dA, need_dB, ctx.backend)
    return (dx if need_dx else None, None, None, _stack_grads(dA, needs[3]), _stack_grads(dB, needs[4]),
            *(None,) * 12)


multi_lora_linear_fwd.register_autograd(_registered_backward, setup_context=_setup_context)


class _MultiLoRALinearFunction(torch.autograd.Function):
    """The eager path with autograd: the same implementations, no custom_op dispatch (see ops/lora_linear.py).
    The A/B stacks are separate arguments (autograd.Function differentiates tensors, not lists); everything
    else travels as one tuple: every argument of apply() costs time."""

    @staticmethod
    def forward(ctx, x, opts, *stacks):
        weight, bias, scalings, bt, ranks, dropout, seed, backend = opts
        ns = len(stacks) // 2
        y, S = _run_fwd(backend, x, weight, bias, list(stacks[:ns]), list(stacks[ns:]), scalings, bt, ranks,
                        dropout, seed)
        ctx.save_for_backward(x, weight, S, seed, *stacks)
        ctx.opts = opts
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, S, seed, *stacks = ctx.saved_tensors
        _, _, scalings, bt, ranks, dropout, _, backend = ctx.opts
        ns = len(stacks) // 2
        need_A, need_B = ctx.needs_input_grad[2:2 + ns], ctx.needs_input_grad[2 + ns:]
        dx, dA, dB = _run_bwd(backend, dy, x, weight, stacks[:ns], stacks[ns:], S, scalings, bt, ranks, dropout,
                              seed, ctx.needs_input_grad[0], any(need_A), any(need_B))
        return (dx, None, *_stack_grads(dA, need_A), *_stack_grads(dB, need_B))


def _traced() -> bool:
    """torch.compile tracing or a profiler run: go through the registered ops (named in graphs and traces).
    Otherwise the eager path calls the implementations directly (custom_op dispatch costs tens of µs)."""
    return torch.compiler.is_compiling() or _profiler_enabled()


_profiler_enabled = torch._C._autograd._profiler_enabled


def _needs_grad(x: Tensor, weight: Tensor, bias, A_stacks: list, B_stacks: list) -> bool:
    """Whether autograd must record this call (grad mode on); the frozen base must not require grad."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        which = "weight" if weight.requires_grad else "bias"
        raise ValueError(f"{which} requires grad, but multi_lora_linear keeps the base layer frozen and computes no "
                         f"gradient for it: call {which}.requires_grad_(False) (as PEFT does), or run under "
                         "torch.no_grad()")
    return x.requires_grad or any(t.requires_grad for t in A_stacks) or any(t.requires_grad for t in B_stacks)


def run_linear(x2: Tensor, weight: Tensor, bias, A_stacks: list, B_stacks: list, scalings: Tensor, bt: tuple,
               ranks, backend: Optional[str], dropout: Optional[Tensor] = None,
               seed: Optional[Tensor] = None) -> Tensor:
    """multi_lora_linear on checked arguments (x2 is [T, in]; dropout and seed from `dropout_args`): the
    registered ops when traced, else the implementations directly -- under an autograd.Function when a
    gradient is needed, bare otherwise (the inference path: no autograd machinery at all)."""
    need = torch.is_grad_enabled() and _needs_grad(x2, weight, bias, A_stacks, B_stacks)
    if _traced():
        if need or seed is not None:
            return multi_lora_linear_fwd(x2, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, dropout, seed,
                                         backend or "auto")[0]
        return multi_lora_linear_op(x2, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, backend or "auto")
    if need:
        return _MultiLoRALinearFunction.apply(x2, (weight, bias, scalings, bt, ranks, dropout, seed, backend),
                                              *A_stacks, *B_stacks)
    if seed is not None:
        return _run_fwd(backend, x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed)[0]
    args = (x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks)
    name = backend if backend is not None and backend != "auto" else _fwd_backend(args, x2, weight, bias, A_stacks,
                                                                                   B_stacks)
    return LINEAR[name](*args)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------

def _as_list(stacks) -> list:
    return [stacks] if isinstance(stacks, Tensor) else list(stacks) if isinstance(stacks, (list, tuple)) else stacks


def _check_batch_obj(batch) -> None:
    if not isinstance(batch, LoRABatch):
        raise TypeError(f"batch must be a LoRABatch (LoRABatch.from_token_adapters), got {type(batch).__name__}")


def _ranks_arg(ranks: Optional[Tensor]) -> Optional[Tensor]:
    if ranks is None:
        return None
    if not isinstance(ranks, Tensor) or ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise TypeError(f"ranks must be None or an integer tensor of shape [L], got {_shape(ranks)}")
    return ranks if ranks.dtype == torch.int32 else ranks.to(torch.int32)


def _scalings_arg(scalings, L: int, device) -> Tensor:
    if isinstance(scalings, (int, float)):
        return torch.full((L,), float(scalings), dtype=torch.float32, device=device)
    if not isinstance(scalings, Tensor):
        raise TypeError(f"scalings must be a float tensor of shape [L], got {type(scalings).__name__}")
    return scalings if scalings.dtype in (torch.float32, torch.float64) else scalings.float()


def dropout_args(dropout_p, num_slots: int, device, training: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dropout, seed) for one multi_lora_linear call: the per-slot probabilities as a float64 [L] tensor on
    `device` and a fresh seed (`lk.dropout.new_seed`, from torch's CPU generator), or (None, None) when no
    dropout applies (not training, or p = 0 for every slot). Checks dropout_p whatever `training` says.

    dropout_p: None, one float in [0, 1) for every slot, or a float tensor [L] of per-slot probabilities in
    [0, 1) (its values are read on the host: free on CPU, one sync for a CUDA tensor; not under torch.compile).
    """
    if dropout_p is None:
        return None, None
    if isinstance(dropout_p, Tensor):
        if dropout_p.shape != (num_slots,) or not dropout_p.is_floating_point():
            raise ValueError(f"dropout_p must be None, a float or a float tensor of shape [L={num_slots}], got "
                             f"{_shape(dropout_p)} {dropout_p.dtype}")
        if not torch.compiler.is_compiling():
            ps = dropout_p.tolist()
            bad = [p for p in ps if not 0.0 <= p < 1.0]
            if bad:
                raise ValueError(f"dropout_p must lie in [0, 1) for every slot, got {bad[:8]}")
            if not any(ps):
                return None, None
        if not training:
            return None, None
        return dropout_p.to(device=device, dtype=torch.float64), new_seed()
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be None, a float in [0, 1) or a float tensor of shape [L={num_slots}], "
                         f"got {dropout_p!r}")
    if not training or dropout_p == 0.0:
        return None, None
    return torch.full((num_slots,), float(dropout_p), dtype=torch.float64, device=device), new_seed()


def lora_shrink(x: Tensor, A_stack, batch: LoRABatch, ranks: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Grouped LoRA shrink: ``S[t, i·R + j] = x[t] · A_i[l, j]`` for ``j < ranks[l]``, l = batch slot of t.

    Args:
        x: [T, in] activations (any strides), T = batch.num_tokens.
        A_stack: [L, R, in] slot stack, or a list of NS such stacks (one per output slice).
        batch: the step's LoRABatch (L = batch.num_slots).
        ranks: [L] int or None (R for all). Columns j >= ranks[l] of S are 0; rows of -1 tokens are 0.
        backend: None (fastest for the device), "torch", "triton" or "native".

    Returns S: [T, NS·R] float32. No gradients (an inference building block).
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    backend = resolve_backend(backend, x.device)
    A_stacks, ranks, bt = _as_list(A_stack), _ranks_arg(ranks), batch.op_args()
    check_shrink_args(x, A_stacks, bt, ranks, backend)
    if _traced():
        return lora_shrink_op(x, A_stacks, *bt, ranks, backend)
    return SHRINK[backend](x, A_stacks, bt, ranks)


def lora_expand(S: Tensor, B_stack, batch: LoRABatch, y: Tensor, scalings, ranks: Optional[Tensor] = None,
                y_offset: int = 0, backend: Optional[str] = None) -> Tensor:
    """Grouped LoRA expand, added into ``y`` in place; returns ``y``.

    ``y[t, c_i + n] += scalings[l] · Σ_{j<ranks[l]} S[t, i·R + j] · B_i[l, n, j]`` for tokens with slot
    l >= 0, where slice i's columns start at ``c_i = y_offset + Σ_{k<i} out_k``.

    Args:
        S: [T, NS·R] float32 (from lora_shrink).
        B_stack: [L, out, R] slot stack, or a list of NS stacks [L, out_i, R] (e.g. q/k/v of different widths).
        batch: the step's LoRABatch.
        y: [T, >= y_offset + Σ out_i] (any strides), updated in place; -1 tokens are left untouched.
        scalings: [L] float tensor (or one float for all slots); ranks: [L] int or None.
    """
    _check_batch_obj(batch)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    backend = resolve_backend(backend, y.device)
    B_stacks, ranks, bt = _as_list(B_stack), _ranks_arg(ranks), batch.op_args()
    scalings = _scalings_arg(scalings, batch.num_slots, y.device)
    check_expand_args(S, B_stacks, bt, y, scalings, ranks, y_offset, backend)
    if _traced():
        lora_expand_op(S, B_stacks, *bt, y, scalings, ranks, int(y_offset), backend)
    else:
        EXPAND[backend](S, B_stacks, bt, y, scalings, ranks, int(y_offset))
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stack, B_stack, scalings,
                      batch: LoRABatch, ranks: Optional[Tensor] = None, backend: Optional[str] = None,
                      dropout_p=None, training: bool = False) -> Tensor:
    """Fused multi-adapter LoRA linear: ``y[t] = x[t] W0ᵀ + b + s_l · (x̂[t] A_lᵀ) B_lᵀ``, l = slot of t.

    Inference ("triton"): the grouped shrink, then the base GEMM over the tokens in sorted order with the
    expand of the slots present in each tile added in its epilogue, so y is written once. With autograd, the
    forward keeps S = x̂ Aᵀ (not x̂, not the mask) for the backward (see the module docstring).

    Args:
        x: [..., in] activations; the leading dims flatten to T = batch.num_tokens tokens (row-major).
        weight: [out, in] frozen base weight W0 (x's dtype); bias: [out] or None. Neither may require grad
            while autograd is on (no gradient is computed for them: freeze them, as PEFT does).
        A_stack: [L, R, in] or a list of NS stacks; B_stack: [L, out, R] or a list of NS stacks
            [L, out_i, R] with Σ out_i = out (the fused layer's output slices, in column order).
        scalings: [L] float tensor (or a float); ranks: [L] int or None (R for every slot).
        batch: the step's LoRABatch; backend: None, "torch", "triton", "composite" or "native".
        dropout_p: LoRA dropout, applied to the LoRA path only when `training`: None, a float in [0, 1) for
            every slot, or a float tensor [L] of per-slot probabilities. The mask is regenerated from one seed
            per call (drawn from torch's CPU generator): `lk.dropout_mask(seed, (T, in), p_l)` row t.

    Returns y: [..., out] in x's dtype. Gradients flow to x and to the A/B stacks (each in its own dtype);
    not to scalings.
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_backend(backend, x.device)
    A_stacks, B_stacks, ranks, bt = _as_list(A_stack), _as_list(B_stack), _ranks_arg(ranks), batch.op_args()
    scalings = _scalings_arg(scalings, batch.num_slots, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x
    check_linear_args(x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend)
    dropout, seed = dropout_args(dropout_p, batch.num_slots, x.device, training)
    y = run_linear(x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend, dropout, seed)
    return y.view(*lead, weight.shape[0])
