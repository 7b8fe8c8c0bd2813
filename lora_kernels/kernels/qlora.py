"""Triton kernels for LoRA over a 4-bit quantized base (QLoRA; the layout of lora_kernels/quant.py).

    dequantize  W[i] = fp32(T[code(i)] · absmax[i // 64]) → fmt.dtype → out dtype     _dequant4_kernel
    forward     y    = x deq(W0)ᵀ + b + s · S Bᵀ,  S = x̂ Aᵀ                            _qlora_gemm_kernel
                       (S by lora_linear's _lora_shrink_kernel; the LoRA term in the GEMM's epilogue,
                       lora_linear's _add_lora)
    backward    dx   = G deq(W0) + (dS A) ⊙ m / (1-p)                                   _qlora_gemm_kernel
                       (W0 read transposed, decoded in the main loop; dS, dB and dA by lora_linear's kernels)

W0 [out, in] is n = out · in 4-bit codes over the flattened weight, two a byte (high nibble first), one float32
scale per block of 64 consecutive values: blocks cross rows when in % 64 != 0, so every element finds its
scale from its own flat index i = o · in + k (never from its row). Nested absmax: absmax[b] =
fp32(code2[q[b]] · a2[b // 256]) + offset. The fused GEMM decodes each [BLOCK_K, BLOCK_N] tile of W0ᵀ in
registers inside its main loop (nibble unpack, the 16-entry table, the per-element block scale): it reads the
4-bit weight once per row-block of x and never writes a dense copy. Every flat index is 64-bit (out · in
passes 2^31 for the largest layers' element offsets of the dense equivalent).

Bit-exactness: on a GPU the products are `mul.rn.f32` (inline PTX): a plain multiply followed by the nested
offset's add may be contracted into one FMA by the compiler, which rounds once instead of twice and would not
match bitsandbytes. Under TRITON_INTERPRET=1 (numpy) plain multiplies round as PyTorch's do; the
interpreter's fp32 → bf16 cast truncates where the GPU rounds (tests compare bf16 within one ulp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels import quant
from lora_kernels.backends import TRITON_INTERPRETED
from lora_kernels.kernels import lora_linear as kl
from lora_kernels.kernels._common import TL_DTYPE, gemm_tile, mma
from lora_kernels.kernels._launch import Launch
from lora_kernels.kernels.lora_linear import _add_lora

# mul.rn.f32 needs the PTX backend; the interpreter's numpy multiply already rounds once per product.
_EXACT_MUL = not TRITON_INTERPRETED


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    """a · b rounded once to float32, never contracted into an FMA with a following add."""
    if EXACT:
        r = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r",
                                      [a.to(tl.int32, bitcast=True), b.to(tl.int32, bitcast=True)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        return r.to(tl.float32, bitcast=True)
    else:
        return a * b


@triton.jit
def _decode4(codes_ptr, absmax_ptr, nabs_ptr, ncode_ptr, noff_ptr, table_ptr, idx, mask,
             NESTED: tl.constexpr, NESTED_BS: tl.constexpr, QBLOCK: tl.constexpr, EXACT: tl.constexpr):
    """float32 values of the 4-bit weight at flat (int64) indices `idx` (0 where ~mask)."""
    byte = tl.load(codes_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (idx & 1)) * 4).to(tl.int32)) & 15  # even index: high nibble
    v = tl.load(table_ptr + code)  # 16 entries, always in bounds
    blk = idx // QBLOCK
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(ncode_ptr + q).to(tl.float32)
        a2 = tl.load(nabs_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        a = _mul_rn(c2, a2, EXACT) + tl.load(noff_ptr).to(tl.float32)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return tl.where(mask, _mul_rn(v, a, EXACT), 0.0)


@triton.jit
def _dequant4_kernel(codes_ptr, absmax_ptr, nabs_ptr, ncode_ptr, noff_ptr, table_ptr, out_ptr, n,
                     NESTED: tl.constexpr, NESTED_BS: tl.constexpr, QBLOCK: tl.constexpr, W_DTYPE: tl.constexpr,
                     EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] (flat, contiguous) = deq(W0)[i] rounded to W_DTYPE (the format's dtype), then to out's dtype."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    w = _decode4(codes_ptr, absmax_ptr, nabs_ptr, ncode_ptr, noff_ptr, table_ptr, idx, mask,
                 NESTED, NESTED_BS, QBLOCK, EXACT)
    tl.store(out_ptr + idx, w.to(W_DTYPE).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _qlora_gemm_kernel(
    x_ptr, codes_ptr, absmax_ptr, nabs_ptr, ncode_ptr, noff_ptr, table_ptr, bias_ptr, l_ptr, e_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_bias, stride_lm, stride_lr, stride_er, stride_en,
    stride_om, stride_on, stride_os,
    has_bias, lora_scale, seed, drop_threshold, keep_scale, k_per_split,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, QBLOCK: tl.constexpr, W_DTYPE: tl.constexpr,
    EXACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = x Q (+ bias) + lora_scale · (L E) [⊙ m / (1-p)], Q [K, N] a view of the 4-bit W0 decoded
    tile by tile: Q[k, n] = deq(W0) at flat index k · stride_wk + n · stride_wn.

    forward: x, Q = W0ᵀ (stride_wk = 1, stride_wn = in), L = S, E = Bᵀ, bias;  backward dx: x = G,
    Q = W0 (stride_wk = in, stride_wn = 1), L = dS, E = A, the dropout mask over (row, col) of dx -- the
    4-bit weight read once, no dense copy. A tile may straddle scale blocks (and, when in % 64 != 0, blocks
    that start in one row and end in the next), which the per-element scale lookup handles. Decoded values
    round to W_DTYPE (what bitsandbytes dequantizes to), then to x's dtype, as dequantize-then-matmul does.
    Grid (tiles, splits) and the split / epilogue rules as lora_linear's _gemm_lora_kernel: only split 0 adds
    the bias and the LoRA term.
    """
    pid_k = tl.program_id(1)
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    col_start = offs_n * stride_wn  # int64 flat index of Q[0, n]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _decode4(codes_ptr, absmax_ptr, nabs_ptr, ncode_ptr, noff_ptr, table_ptr,
                     col_start[None, :] + offs_k[:, None] * stride_wk, mask_k[:, None] & mask_n[None, :],
                     NESTED, NESTED_BS, QBLOCK, EXACT)
        acc = mma(xt, w.to(W_DTYPE).to(x_ptr.dtype.element_ty), acc, CT, PRECISION)
    if pid_k == 0:
        if has_bias != 0:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc = _add_lora(acc, l_ptr, e_ptr, offs_m, offs_n, pid_n.to(tl.int64) * BLOCK_N, mask_m, mask_n, R,
                        stride_lm, stride_lr, stride_er, stride_en, lora_scale, seed, drop_threshold, keep_scale,
                        N, HAS_DROPOUT, CT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# Configs. No GPU was available to tune them: lora_linear's GEMM classes, sized for the decode work in the
# main loop (each thread decodes BLOCK_K · BLOCK_N / threads values a step: kept at <= 32, so the int64
# indices, the gathered bytes and scales fit in registers beside the accumulator; the AOT check counts
# spills). (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by (M class, activation bytes).
# --------------------------------------------------------------------------------------------------
_QLORA_GEMM_CONFIGS = {
    # M <= 16 (decode): a GEMV over the packed weight; 16-wide N tiles give 256 tiles for 4096 columns.
    ("small", 2): (16, 16, 128, 1, 4, 3),
    # 16 < M <= 512: 64x64 tiles (HGMMA on sm_90); M = 128 at out = 4096 splits K to fill 132 SMs. At 4 warps
    # the decode beside the tile took 255 registers and spilled 80 B on sm_80; 8 warps: 185 (sm_80) / 150 (sm_90).
    ("medium", 2): (64, 64, 64, 8, 8, 3),
    # 128x128 at 3 stages wanted 240-256 KB of shared memory and spilled on sm_80; 128x64 at 2 stages:
    # 193 / 146 registers, 72 / 88 KB, no spill.
    ("large", 2): (128, 64, 64, 8, 8, 2),
    # float32 activations: exact fp32 dots on FMA units (operands in registers). lora_linear's 16x32x64 and
    # 32x64x32 at 4 warps hit 255 registers and spilled 88-128 B with the decode; 8 warps, 2 stages, smaller
    # tiles: 128 / 100 registers (sm_80 / sm_90), no spill.
    ("small", 4): (16, 32, 32, 1, 8, 2),
    ("medium", 4): (32, 32, 32, 8, 8, 2),
    ("large", 4): (32, 32, 32, 8, 8, 2),
}
DEQUANT_BLOCK = 1024  # values per program of _dequant4_kernel


def gemm_configs(M: int, elem_size: int) -> list[tuple]:
    """The shipped fused-GEMM configs for M rows of `elem_size`-byte activations: the launcher's pick first,
    then the others a tuner may time (each is correct for every shape; the AOT check compiles them all)."""
    return kl.shipped_configs(_QLORA_GEMM_CONFIGS, M, elem_size)


def _quant_args(fmt, codes, absmax, nested_absmax, nested_code, nested_offset) -> tuple[dict, dict]:
    """(pointer args, constexprs) of the 4-bit weight; the unused nested pointers stand in as absmax."""
    if fmt.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"the Triton 4-bit kernels read nf4 / fp4 weights, got {fmt.quant_type!r}")
    nested = nested_absmax is not None
    args = dict(codes_ptr=codes, absmax_ptr=absmax, nabs_ptr=nested_absmax if nested else absmax,
                ncode_ptr=nested_code if nested else absmax, noff_ptr=nested_offset if nested else absmax,
                table_ptr=quant.table(fmt.quant_type, codes.device))
    consts = dict(NESTED=nested, NESTED_BS=fmt.nested_blocksize, QBLOCK=fmt.blocksize, W_DTYPE=TL_DTYPE[fmt.dtype],
                  EXACT=_EXACT_MUL)
    return args, consts


# --------------------------------------------------------------------------------------------------
# Plans (meta tensors work: the AOT check compiles exactly these)
# --------------------------------------------------------------------------------------------------

def plan_dequant(qweight, dtype=None):
    """(launches, W0 [out, in] in `dtype`, default the format's dtype)."""
    fmt = qweight.fmt
    out = kl._alloc(fmt.shape, dtype or fmt.dtype, qweight.codes.device)
    args, consts = _quant_args(fmt, *qweight.tensors())
    n = fmt.numel
    return [Launch(_dequant4_kernel, (triton.cdiv(n, DEQUANT_BLOCK),), dict(**args, out_ptr=out, n=n),
                   dict(**consts, BLOCK=DEQUANT_BLOCK), num_warps=4, num_stages=1)], out


def _gemm_plan(P, qweight, transposed: bool, bias, L, E, out_shape, lora_scale, dropout_p, seed, lora_dtype,
               gemm_config=None):
    """(launches, out = P Q (+ bias) + lora_scale · L E [dropout over out]) in P's dtype, Q = deq(W0)ᵀ
    (forward) or, `transposed`, deq(W0) (dx). E: a strided view."""
    fmt = qweight.fmt
    M, K = P.shape
    N = out_shape[1]
    seed, thr, keep_scale = kl._dropout_args(dropout_p, seed)
    ct, _, precision = kl._compute_types(P.dtype, lora_dtype)
    config = gemm_config or gemm_configs(M, P.element_size())[0]
    bm, bn, bk, group_m, warps, stages = config
    split = kl.gemm_split_k(M, N, K, config)
    blocks_per_split, split = kl._ranges(triton.cdiv(K, bk), split)
    # Split partials go to a float32 workspace summed in a fixed order (as lora_linear's GEMM): no atomics.
    out, target, stride_os, _, finish = kl._split_output(split, out_shape, P.dtype, P.device, True)
    args, consts = _quant_args(fmt, *qweight.tensors())
    w_in = fmt.shape[1]
    stride_wk, stride_wn = (w_in, 1) if transposed else (1, w_in)
    launch = Launch(
        _qlora_gemm_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn), split),
        dict(x_ptr=P, **args, bias_ptr=bias if bias is not None else target, l_ptr=L, e_ptr=E, out_ptr=target,
             M=M, N=N, K=K, R=L.shape[1], stride_xm=P.stride(0), stride_xk=P.stride(1), stride_wk=stride_wk,
             stride_wn=stride_wn, stride_bias=bias.stride(0) if bias is not None else 0, stride_lm=L.stride(0),
             stride_lr=L.stride(1), stride_er=E.stride(0), stride_en=E.stride(1), stride_om=target.stride(0),
             stride_on=target.stride(1), stride_os=stride_os, has_bias=int(bias is not None),
             lora_scale=float(lora_scale), seed=seed, drop_threshold=thr, keep_scale=keep_scale,
             k_per_split=blocks_per_split * bk),
        dict(**consts, HAS_DROPOUT=thr > 0, CT=ct, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
             BLOCK_R=kl._EPILOGUE_BLOCK_R, GROUP_M=group_m),
        num_warps=warps, num_stages=stages)
    return [launch] + finish, out


def plan_fwd(x, qweight, bias, A, B, scaling, dropout_p, seed, deterministic: bool = False, gemm_config=None):
    """(launches, y [M, out] in x's dtype, S [M, r] float32) of the fused forward: lora_linear's shrink, then
    the fused W4A16 GEMM with the LoRA expand in its epilogue."""
    launches, S = kl._shrink_plan(x, A, 1.0, dropout_p, seed, deterministic)
    gemm, y = _gemm_plan(x, qweight, False, bias, S, B.t(), (x.shape[0], qweight.fmt.shape[0]), scaling, 0.0, None,
                         A.dtype, gemm_config)
    return launches + gemm, y, S


def plan_bwd(G, x, qweight, A, B, S, scaling, dropout_p, seed, need_dx: bool, need_dA: bool, need_dB: bool,
             deterministic: bool = False, gemm_config=None):
    """(launches, dx, dA, dB) of the fused backward, each None when not needed: lora_linear's dS / dB and dA
    kernels, and dx = G deq(W0) + (dS A) ⊙ m / (1-p) by the W4A16 GEMM reading W0 transposed (no dense copy)."""
    launches, dS, dB = kl._ds_db_plan(G, B, S, scaling, need_dx or need_dA, need_dB, deterministic)
    dx = dA = None
    if need_dx:
        gemm, dx = _gemm_plan(G, qweight, True, None, dS, A, tuple(x.shape), 1.0, dropout_p, seed, A.dtype,
                              gemm_config)
        launches += gemm
    if need_dA:
        da, dA = kl._da_plan(dS, x, A, dropout_p, seed, deterministic)
        launches += da
    return launches, dx, dA, dB


# --------------------------------------------------------------------------------------------------
# Launchers called by ops/qlora.py (inputs are checked there)
# --------------------------------------------------------------------------------------------------

def dequantize_triton(qweight, dtype=None) -> torch.Tensor:
    """W0 [out, in] of a 4-bit `QuantWeight` in `dtype` (default its format's dtype): bitsandbytes' values
    (bit-exact on a GPU; see the module docstring for bf16 under the interpreter)."""
    launches, W = plan_dequant(qweight, dtype)
    kl._run(launches)
    return W


def qlora_linear_fwd_triton(x, qweight, bias, A, B, scaling, dropout_p, seed, gemm_config=None):
    """(y [M, out] in x's dtype, S [M, r] float32) for 2-D x over a 4-bit `QuantWeight`."""
    launches, y, S = plan_fwd(x, qweight, bias, A, B, scaling, dropout_p, seed,
                              torch.are_deterministic_algorithms_enabled(), gemm_config)
    kl._run(launches)
    return y, S


def qlora_linear_bwd_triton(dy, x, qweight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                            gemm_config=None):
    """(dx, dA, dB), each None when not needed, over a 4-bit `QuantWeight`: no dense W0."""
    launches, dx, dA, dB = plan_bwd(dy.to(x.dtype), x, qweight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA,
                                    need_dB, torch.are_deterministic_algorithms_enabled(), gemm_config)
    kl._run(launches)
    return dx, dA, dB
