"""Multi-adapter LoRA serving ops: one batch, one adapter slot per token (Punica SGMV/BGMV, S-LoRA).

Semantics (PEFT layout per slot; L slots, padded rank R, NS output slices)::

    A_stacks[i]: [L, R, in]      B_stacks[i]: [L, out_i, R]      scalings: [L] float32
    ranks: [L] int32 or None (None: R for every slot). Slot l uses rows/columns [0, r_l) of its A/B, with
        r_l = clamp(ranks[l], 0, R); what lies beyond r_l is never read into the result (padding need not be
        zero). r_l = 0 means "slot l has no adapter in this layer": its tokens get the base output only.
    token_adapter: [T] int, the slot of each token, -1 = no adapter.

    S[t, i·R + j] = x[t] · A_i[l, j]                        for j < r_l, l = token_adapter[t] >= 0; else 0
    y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j]      (c_i = y_offset + Σ_{k<i} out_k)
    multi_lora_linear: y = x W0ᵀ + b + the expand above, with W0 = [Σ out_i, in] and y_offset = 0.

`-1` tokens and slots without tokens do no LoRA work in the "triton" backend. Inference only: the ops
have no autograd formula.

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
        str backend) -> Tensor

    x: [T, in] (2-D, any strides); weight: [Σ out_i, in]; bias: [Σ out_i] or None; S: [T, NS·R];
    y: [T, >= y_offset + Σ out_i] (any strides, updated in place); lora_shrink returns S [T, NS·R] float32
    (float64 when x or A is float64, "torch" backend only) and zero where the formula above says 0;
    multi_lora_linear returns y [T, Σ out_i] in x's dtype. All LoRABatch tensors and `ranks` are int32,
    `scalings` float32. "triton"/"native": x in fp16/bf16/fp32 and the A/B stacks in x's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lora_kernels.backends import resolve_backend

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


# ----------------------------------------------------------------------------------------------------
# Per-step metadata
# ----------------------------------------------------------------------------------------------------

def tile_block_m(num_tokens: int) -> int:
    """Rows per segment tile of the grouped kernels: 16 for decode-sized batches, else 64.

    A function of T only, so a LoRABatch's shapes are fixed by (T, num_slots) and the Triton launchers
    can recompute it from x's shape.
    """
    return 16 if num_tokens <= 128 else 64


def num_tiles(num_tokens: int, num_slots: int) -> int:
    """Upper bound on the segment tiles of any assignment: each non-empty segment adds <= 1 partial tile."""
    bm = tile_block_m(num_tokens)
    return -(-num_tokens // bm) + min(num_slots, num_tokens)


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
        check=False: nothing is read back, so the batch can be built inside a CUDA-graph capture or a hot
        decode loop whose ids are known valid (serving builds them from its own slot table); a bad id then
        stops the stream with a device-side assert (torch._assert_async) instead of computing anything.
        """
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if not isinstance(token_adapter, Tensor):
            token_adapter = torch.as_tensor(list(token_adapter), dtype=torch.int32, device=device)
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
            seq_slots = torch.as_tensor(list(seq_slots), dtype=torch.int32, device=device)
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
    if backend in ("triton", "native"):
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
    if backend in ("triton", "native") and (S.dtype != torch.float32 or scalings.dtype != torch.float32):
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
    if backend in ("triton", "native") and scalings.dtype != torch.float32:
        raise TypeError(f"backend={backend!r} needs scalings in float32, got {scalings.dtype}")


# ----------------------------------------------------------------------------------------------------
# Composite PyTorch implementation: the "torch" backend (any device, any float dtype). It walks the
# active segments with one host read of seg_lens (free on CPU; on CUDA use "triton" or "native").
# ----------------------------------------------------------------------------------------------------

def _segments(sorted_token_ids, seg_starts, seg_lens, ranks, R):
    starts, lens = seg_starts.tolist(), seg_lens.tolist()
    rks = [R] * len(lens) if ranks is None else [min(max(int(r), 0), R) for r in ranks.tolist()]
    for l, (s, n) in enumerate(zip(starts, lens)):
        if n > 0 and rks[l] > 0:
            yield l, rks[l], sorted_token_ids[s:s + n].long()


def _torch_shrink(x, A_stacks, batch_tensors, ranks):
    _, sid, ss, sl = batch_tensors[:4]
    L, R, _ = A_stacks[0].shape
    ct = torch.promote_types(torch.promote_types(x.dtype, A_stacks[0].dtype), torch.float32)
    S = torch.zeros(x.shape[0], len(A_stacks) * R, dtype=ct, device=x.device)
    for l, r, toks in _segments(sid, ss, sl, ranks, R):
        xs = x.index_select(0, toks).to(ct)
        for i, A in enumerate(A_stacks):
            S[toks, i * R:i * R + r] = xs @ A[l, :r].to(ct).T
    return S


def _torch_expand(S, B_stacks, batch_tensors, y, scalings, ranks, y_offset):
    _, sid, ss, sl = batch_tensors[:4]
    R = B_stacks[0].shape[2]
    ct = torch.promote_types(torch.promote_types(S.dtype, B_stacks[0].dtype), torch.float32)
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


# ----------------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def lora_shrink_op(x: Tensor, A_stacks: list[Tensor], token_adapter: Tensor, sorted_token_ids: Tensor,
                   seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_end: Tensor,
                   ranks: Optional[Tensor], backend: str) -> Tensor:
    """S [T, NS·R]: S[t, i·R + j] = x[t] · A_i[l, j] for j < r_l, l = token_adapter[t] >= 0; else 0."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    if backend == "triton":
        from lora_kernels.kernels.multi_lora import lora_shrink_triton
        return lora_shrink_triton(x, list(A_stacks), bt, ranks)
    if backend == "native":
        return torch.ops.lora_kernels.native_lora_shrink(x, A_stacks, *bt, ranks)
    return _torch_shrink(x, A_stacks, bt, ranks)


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
    if backend == "triton":
        from lora_kernels.kernels.multi_lora import lora_expand_triton
        lora_expand_triton(S, list(B_stacks), bt, y, scalings, ranks, y_offset)
    elif backend == "native":
        torch.ops.lora_kernels.native_lora_expand(S, B_stacks, *bt, y, scalings, ranks, y_offset)
    else:
        _torch_expand(S, B_stacks, bt, y, scalings, ranks, y_offset)


@lora_expand_op.register_fake
def _(S, B_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end,
      y, scalings, ranks, y_offset, backend):
    return None


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stacks: list[Tensor],
                         B_stacks: list[Tensor], scalings: Tensor, token_adapter: Tensor, sorted_token_ids: Tensor,
                         seg_starts: Tensor, seg_lens: Tensor, tile_slot: Tensor, tile_start: Tensor,
                         tile_end: Tensor, ranks: Optional[Tensor], backend: str) -> Tensor:
    """y [T, out] = x W0ᵀ + b + per-token LoRA (see the module docstring), in x's dtype."""
    bt = (token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start, tile_end)
    if backend == "triton":
        from lora_kernels.kernels.multi_lora import multi_lora_linear_triton
        return multi_lora_linear_triton(x, weight, bias, list(A_stacks), list(B_stacks), scalings, bt, ranks)
    if backend == "native":
        return torch.ops.lora_kernels.native_multi_lora_linear(x, weight, bias, A_stacks, B_stacks, scalings,
                                                                *bt, ranks)
    y = torch.nn.functional.linear(x, weight, bias)
    if y.shape[0] > 0:
        _torch_expand(_torch_shrink(x, A_stacks, bt, ranks), B_stacks, bt, y, scalings, ranks, 0)
    return y


@multi_lora_linear_op.register_fake
def _(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, sorted_token_ids, seg_starts, seg_lens,
      tile_slot, tile_start, tile_end, ranks, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


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


def lora_shrink(x: Tensor, A_stack, batch: LoRABatch, ranks: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """Grouped LoRA shrink: ``S[t, i·R + j] = x[t] · A_i[l, j]`` for ``j < ranks[l]``, l = batch slot of t.

    Args:
        x: [T, in] activations (any strides), T = batch.num_tokens.
        A_stack: [L, R, in] slot stack, or a list of NS such stacks (one per output slice).
        batch: the step's LoRABatch (L = batch.num_slots).
        ranks: [L] int or None (R for all). Columns j >= ranks[l] of S are 0; rows of -1 tokens are 0.
        backend: None (fastest for the device), "torch", "triton" or "native".

    Returns S: [T, NS·R] float32.
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    backend = resolve_backend(backend, x.device)
    A_stacks, ranks, bt = _as_list(A_stack), _ranks_arg(ranks), batch.op_args()
    check_shrink_args(x, A_stacks, bt, ranks, backend)
    return lora_shrink_op(x, A_stacks, *bt, ranks, backend)


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
    lora_expand_op(S, B_stacks, *bt, y, scalings, ranks, int(y_offset), backend)
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A_stack, B_stack, scalings,
                      batch: LoRABatch, ranks: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Fused multi-adapter LoRA linear: ``y[t] = x[t] W0ᵀ + b + s_l · (x[t] A_lᵀ) B_lᵀ``, l = slot of t.

    The "triton" backend runs the grouped shrink, then the base GEMM over the tokens in sorted order
    with the expand of the slots present in each tile added in its epilogue, so y is written once.

    Args:
        x: [..., in] activations; the leading dims flatten to T = batch.num_tokens tokens (row-major).
        weight: [out, in] base weight W0 (x's dtype); bias: [out] or None.
        A_stack: [L, R, in] or a list of NS stacks; B_stack: [L, out, R] or a list of NS stacks
            [L, out_i, R] with Σ out_i = out (the fused layer's output slices, in column order).
        scalings: [L] float tensor (or a float); ranks: [L] int or None (R for every slot).
        batch: the step's LoRABatch; backend: None, "torch", "triton" or "native".

    Returns y: [..., out] in x's dtype. Inference only (no gradients).
    """
    _check_batch_obj(batch)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    backend = resolve_backend(backend, x.device)
    A_stacks, B_stacks, ranks, bt = _as_list(A_stack), _as_list(B_stack), _ranks_arg(ranks), batch.op_args()
    scalings = _scalings_arg(scalings, batch.num_slots, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x
    check_linear_args(x2, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, backend)
    y = multi_lora_linear_op(x2, weight, bias, A_stacks, B_stacks, scalings, *bt, ranks, backend)
    return y.view(*lead, weight.shape[0])
