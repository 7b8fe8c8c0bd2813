"""Argument checks of the multi-adapter ops (`lora_shrink`, `lora_expand`, `multi_lora_linear`): every input no
backend can run raises a clear error naming the argument and the expected shape, before any kernel launches.
Shapes and conventions: `lora_kernels/ops/multi_lora.py`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_kernels.kernels.tiling import num_tiles
from lora_kernels.ops.batch import LoRABatch
from lora_kernels.ops.plumbing import KERNEL_DTYPES
from lora_kernels.ops.plumbing import shape_str as _shape

_KERNEL_BACKENDS = ("triton", "native", "composite")  # every backend but "torch": kernel dtypes only


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
        if act.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} supports {act_name} of dtype {KERNEL_DTYPES}, got {act.dtype}")
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


def check_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, batch_tensors, ranks, backend,
                      col_scale=None) -> None:
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
    check_col_scale(col_scale, x, A_stacks, out_f, L, backend)


def check_col_scale(col_scale, x, A_stacks, out_f: int, L: int, backend) -> None:
    """col_scale: None, or [L + 1, out] in float32 or the LoRA compute dtype (float32 only for the kernel
    backends), on x's device."""
    if col_scale is None:
        return
    ct = torch.promote_types(torch.promote_types(x.dtype, A_stacks[0].dtype), torch.float32)
    ok = (torch.float32,) if backend in _KERNEL_BACKENDS else tuple({torch.float32, ct})
    if not isinstance(col_scale, Tensor) or col_scale.shape != (L + 1, out_f) or col_scale.dtype not in ok:
        raise ValueError(f"col_scale must be None or a tensor of shape [L+1={L + 1}, out={out_f}] (row L: the "
                         f"tokens with no adapter) in {' or '.join(str(d) for d in ok)}"
                         f"{'' if backend not in _KERNEL_BACKENDS else f' for backend={backend!r}'}, got "
                         f"{_shape(col_scale)}{' ' + str(col_scale.dtype) if isinstance(col_scale, Tensor) else ''}")
    if col_scale.device != x.device:
        raise ValueError(f"col_scale is on {col_scale.device}, the inputs on {x.device}")


# The public functions' argument normalisation (before the checks above).

def as_list(stacks) -> list:
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
