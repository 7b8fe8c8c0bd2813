"""Pieces shared by the Triton kernel families: the dot helper, the compute-type choice, the in-kernel
dropout mask, atomic-or-store and the fixed-order sum of split partials."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.backends import TRITON_INTERPRETED
from lora_kernels.kernels._launch import Launch

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def mma(a, b, acc, CT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b with both operands in compute type CT (float32 dots use PRECISION: ieee or tf32)."""
    if CT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a.to(CT), b.to(CT), acc)


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row-blocks in a row take the same column
    blocks of the right-hand matrix one after another, while those sit in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, offs_m, offs_n, mask_m, mask_n) of this program's [BLOCK_M, BLOCK_N] output tile of an
    [M, N] GEMM on a 1-D grid in grouped order (`grouped_tile`); offsets in 64 bits."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N


def dot_type(dtype: torch.dtype):
    """The tl type a dot over `dtype` operands runs in.

    Triton 3.8's interpreter computes bf16 tl.dot wrongly (garbage of order 1e10); bf16 products are exact
    in float32, so interpreted runs take the float32 dot, which gives what the GPU's bf16 MMA gives.
    """
    if dtype == torch.bfloat16 and TRITON_INTERPRETED:
        return tl.float32
    return TL_DTYPE[dtype]


@triton.jit
def keep_mask(seed, drop_threshold, offs_m, col_start, n_cols, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dropout keep-mask of the [BLOCK_M, BLOCK_C] tile at rows offs_m, columns col_start.. of an [*, n_cols]
    input (col_start % 4 == 0): one Philox call per 4 columns, see lora_kernels/dropout.py."""
    groups = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    counters = offs_m[:, None] * ((n_cols + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_C))  # column 4g+i <- r_i
    return (bits >> 1).to(tl.int32, bitcast=True) >= drop_threshold


@triton.jit
def store_or_add(ptrs, val, mask, ATOMIC: tl.constexpr):
    """Store `val` (cast to the pointee type), or add it atomically into float32 memory. Relaxed: the
    adds only need to be atomic, and nothing reads the sum before the kernel ends (no fences)."""
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, numel, num_splits, stride_split, BLOCK: tl.constexpr):
    """out[i] = Σ_j ws[j·stride_split + i] summed in the order j = 0, 1, ..: the same bits on every run.
    ws float32, out any float type (the cast to it is fused); both flat and contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptrs = ws_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, num_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_split
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


SUM_BLOCK = 1024  # elements per program of _sum_splits_kernel


def sum_launch(ws, out, splits: int) -> Launch:
    """out = Σ of the `splits` partials in ws (contiguous [splits, *out.shape] float32), in a fixed order;
    splits = 1 is a cast."""
    return Launch(_sum_splits_kernel, (triton.cdiv(out.numel(), SUM_BLOCK),),
                  dict(ws_ptr=ws, out_ptr=out, numel=out.numel(), num_splits=splits, stride_split=out.numel()),
                  dict(BLOCK=SUM_BLOCK), num_warps=4, num_stages=1)
