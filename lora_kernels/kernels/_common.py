"""Pieces shared by the Triton kernel families: the dot helper and the compute-type choice."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.backends import TRITON_INTERPRETED

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


def dot_type(dtype: torch.dtype):
    """The tl type a dot over `dtype` operands runs in.

    Triton 3.8's interpreter computes bf16 tl.dot wrongly (garbage of order 1e10); bf16 products are exact
    in float32, so interpreted runs take the float32 dot, which gives what the GPU's bf16 MMA gives.
    """
    if dtype == torch.bfloat16 and TRITON_INTERPRETED:
        return tl.float32
    return TL_DTYPE[dtype]
