"""Triton kernels for the fused single-adapter LoRA linear (PEFT layout).

    forward   S  = x̂ Aᵀ                              _lora_shrink_kernel       [M, r] float32
              y  = x W0ᵀ + b + s · S Bᵀ               _gemm_lora_kernel         LoRA term in the epilogue
    backward  dS = s · G B,  dB = s · Gᵀ S            _lora_bwd_ds_db_kernel    one pass over G
              dx = G W0 + (dS A) ⊙ m / (1 - p)         _gemm_lora_kernel         LoRA term in the epilogue
              dA = dSᵀ x̂                              _lora_bwd_da_kernel
    composite y  = F.linear(x, W0, b) (cuBLAS), then  _lora_expand_kernel       y += s · S Bᵀ in place
              dx = G W0 (cuBLAS), then                 _lora_expand_kernel       dx += (dS A) ⊙ m / (1 - p)

x̂ = x ⊙ m / (1 - p) is never materialised: every kernel that reads x regenerates the keep-mask m from
the seed (see lora_kernels/dropout.py) for the elements it loads. Accumulation is float32. The LoRA
matmuls run in x's dtype when the adapter weights share it, else in float32 (tf32 when x is 16-bit,
since x's precision bounds the result anyway). Every element offset is computed in 64 bits, and every
pointer comes with its strides (views of any layout are read as they are).

Reductions split across programs (split-K shrink and GEMM, split-M dA and dB, the dS partials of the
n-blocks) add with relaxed float32 atomics (no kernel reads back what it adds, so no fences), or, under
`torch.use_deterministic_algorithms(True)` (and always for the GEMM, whose output is 16-bit), store
partials into a [split, ...] float32 workspace that `_sum_splits_kernel` (kernels/_common.py) sums in a
fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.dropout import SEED_LOW, keep_threshold
from lora_kernels.kernels._common import dot_type, grouped_tile, keep_mask, mma, store_or_add, sum_launch
from lora_kernels.kernels._launch import Launch

# Tests set this to fill every output buffer with NaN before the kernels run: unwritten elements fail.
POISON_OUTPUTS = False


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_ss,
    seed, drop_threshold, scale, k_per_split,
    HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[M, R] (float32) = scale · (x ⊙ m) Aᵀ. Grid (m-blocks, r-blocks, splits): split k reduces over
    K-range [k·k_per_split, (k+1)·k_per_split) and adds into a zeroed S (ATOMIC) or stores its partial at
    S + k·stride_ss. Dropout is a compile-time variant: a runtime branch around the mask made ptxas put
    bf16 tiles on the stack. Also computes dS = s · G B (x = G, A = Bᵀ, scale = s) for the deterministic backward."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, drop_threshold, offs_m, k0, K, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc = mma(x, a, acc, CT, PRECISION)
    store_or_add(s_ptr + pid_k.to(tl.int64) * stride_ss + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                 acc * scale, mask_m[:, None] & mask_r[None, :], ATOMIC)


@triton.jit
def _add_lora(acc, l_ptr, e_ptr, offs_m, offs_n, n_start, mask_m, mask_n, R,
              stride_lm, stride_lr, stride_er, stride_en, lora_scale, seed, drop_threshold, keep_scale, n_cols,
              HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + lora_scale · L[offs_m, :] E[:, offs_n] [⊙ m / (1-p), the mask over (row, col) of an [*, n_cols]
    output; n_start = offs_n[0], a multiple of 4]. Without dropout the LoRA term accumulates straight into
    acc; only with it does it need a tile of its own (the mask applies to it alone), which is why dropout
    is a compile-time variant."""
    if HAS_DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        lora = acc
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = offs_r < R
        l = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        e = tl.load(e_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_en,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = mma(l * lora_scale, e, lora, CT, PRECISION)
    if HAS_DROPOUT:
        keep = keep_mask(seed, drop_threshold, offs_m, n_start, n_cols, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, lora * keep_scale, 0.0)
    else:
        acc = lora
    return acc


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _gemm_lora_kernel(
    p_ptr, q_ptr, bias_ptr, l_ptr, e_ptr, out_ptr, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_bias, stride_lm, stride_lr, stride_er, stride_en,
    stride_om, stride_on, stride_os,
    has_bias, lora_scale, seed, drop_threshold, keep_scale, k_per_split,
    HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = P Q (+ bias) + lora_scale · (L E) [⊙ m / (1-p)] -- the LoRA term added in the epilogue.

    forward: P = x [M, in], Q = W0ᵀ, L = S [M, r], E = Bᵀ, bias;  backward dx: P = G, Q = W0, L = dS,
    E = A, dropout mask over (row, col) of dx. Grid (tiles, splits): split k reduces over the K-range
    [k·k_per_split, (k+1)·k_per_split) and stores at out + k·stride_os (a float32 workspace summed after
    when there are several splits); only split 0 adds the bias and the LoRA term, so they count once.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(p, q, acc, CT, PRECISION)
    if pid_k == 0:
        if has_bias != 0:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc = _add_lora(acc, l_ptr, e_ptr, offs_m, offs_n, pid_n.to(tl.int64) * BLOCK_N, mask_m, mask_n, R,
                        stride_lm, stride_lr, stride_er, stride_en, lora_scale, seed, drop_threshold, keep_scale,
                        N, HAS_DROPOUT, CT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _lora_expand_kernel(
    l_ptr, e_ptr, out_ptr, M, N, R,
    stride_lm, stride_lr, stride_er, stride_en, stride_om, stride_on,
    lora_scale, seed, drop_threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[M, N] += lora_scale · (L E) [⊙ m / (1-p)] in place: one read and one write of out (the cuBLAS
    output of the composite path). forward: L = S, E = Bᵀ; backward: L = dS, E = A, mask over dx."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    n_start = (pid % num_n).to(tl.int64) * BLOCK_N
    offs_m = (pid // num_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = _add_lora(acc, l_ptr, e_ptr, offs_m, offs_n, n_start, mask_m, mask_n, R, stride_lm, stride_lr, stride_er,
                    stride_en, lora_scale, seed, drop_threshold, keep_scale, N,
                    HAS_DROPOUT, CT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_bwd_ds_db_kernel(
    g_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, M, N, R,
    stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
    stride_dbn, stride_dbr, stride_dbs, scaling, m_blocks_per_split,
    COMPUTE_DS: tl.constexpr, DS_ATOMIC: tl.constexpr, DB_ATOMIC: tl.constexpr,
    CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over G [M, out]: dB[out, R] = s · Gᵀ S and (COMPUTE_DS) dS[M, R] = s · G B.

    Grid (n-blocks, r-blocks, M-splits). Program (n, r, k) keeps the [BLOCK_N, BLOCK_R] tile of dB in
    registers while it walks its M-range (m-blocks k·m_blocks_per_split ..), then stores it, adds it into
    a zeroed dB (DB_ATOMIC) or stores it at dB + k·stride_dbs (a workspace summed after). Each G tile
    also yields this n-block's part of dS for its rows, added into a zeroed dS (DS_ATOMIC: several
    n-blocks) or stored (one n-block). Programs start their walk at different m-blocks, so that those
    sharing an M-range add into different rows of dS at a time.
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    if COMPUTE_DS:
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_first = pid_k * m_blocks_per_split
    m_count = tl.minimum(m_blocks_per_split, tl.cdiv(M, BLOCK_M) - m_first)
    for i in range(0, m_count):
        mb = m_first + (i + pid_n) % m_count
        offs_m = mb.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        db = mma(tl.trans(g), s, db, CT, PRECISION)
        if COMPUTE_DS:
            ds = mma(g, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), CT, PRECISION)
            store_or_add(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr, ds * scaling,
                         mask_m[:, None] & mask_r[None, :], DS_ATOMIC)
    store_or_add(db_ptr + pid_k.to(tl.int64) * stride_dbs + offs_n[:, None] * stride_dbn
                 + offs_r[None, :] * stride_dbr, db * scaling, mask_n[:, None] & mask_r[None, :], DB_ATOMIC)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _lora_bwd_da_kernel(
    ds_ptr, x_ptr, da_ptr, M, K, R,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak, stride_das,
    seed, drop_threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dA[R, in] = dSᵀ (x ⊙ m) / (1-p). Grid (k-blocks, r-blocks, splits): split j reduces over m-blocks
    j, j + splits, ... and adds into a zeroed float32 dA (ATOMIC) or stores at dA + j·stride_das."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    split_m = tl.num_programs(2)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * split_m):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        ds_t = tl.load(ds_ptr + offs_r[:, None] * stride_dsr + offs_m[None, :] * stride_dsm,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(seed, drop_threshold, offs_m, pid_k.to(tl.int64) * BLOCK_K, K, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        acc = mma(ds_t, x, acc, CT, PRECISION)
    da_ptrs = da_ptr + pid_s.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    store_or_add(da_ptrs, acc * keep_scale, mask_r[:, None] & mask_k[None, :], ATOMIC)


# --------------------------------------------------------------------------------------------------
# Configs. No GPU was available to tune these: they follow the Triton matmul tutorial's shapes, sized so
# that each compiles for sm_80 and sm_90 without register spills under every supported Triton (the AOT
# test checks), and so that the grids fill an H100 (`python -m lora_kernels.kernels.aot_check --report`
# counts CTAs, occupancy and instructions; a GPU then picks among `gemm_configs` by measurement).
# --------------------------------------------------------------------------------------------------

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by (M class, activation bytes,
# dropout in the epilogue). The dropout mask costs registers (one Philox state per 4 outputs), so tiles
# whose epilogue applies it are smaller. Grids with fewer tiles than _FILL_CTAS split K (gemm_split_k).
_GEMM_CONFIGS = {
    # M <= 16 (decode): a GEMV streaming W0 once; 16-wide N tiles give 256 tiles for 4096 columns.
    ("small", 2, False): (16, 16, 256, 1, 4, 4),
    ("small", 2, True): (16, 16, 256, 1, 4, 4),
    # 16 < M <= 512: 64x64 tiles (HGMMA on sm_90); at out = 4096, M <= 128 splits K to fill the GPU.
    ("medium", 2, False): (64, 64, 64, 8, 4, 3),
    # The dropout epilogue (Philox per element) at 4 warps sat at 128 registers on sm_80 and spilled 8 B under
    # triton 3.9; 8 warps share it: 80 registers, no spill on 3.6-3.9.
    ("medium", 2, True): (64, 64, 64, 8, 8, 3),
    ("large", 2, False): (128, 128, 64, 8, 8, 3),
    ("large", 2, True): (128, 64, 64, 8, 8, 3),
    # float32 activations: exact fp32 dots run on FMA units, whose operands live in registers.
    ("small", 4, False): (16, 32, 64, 1, 4, 3),
    ("small", 4, True): (16, 32, 64, 1, 4, 3),
    ("medium", 4, False): (32, 64, 32, 8, 4, 3),
    ("medium", 4, True): (32, 64, 32, 8, 4, 3),
    ("large", 4, False): (32, 64, 32, 8, 4, 3),
    ("large", 4, True): (64, 32, 32, 8, 4, 3),
}
_EPILOGUE_BLOCK_R = 16  # the GEMM epilogue walks the rank in chunks of 16 (tl.dot's minimum)
_TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM H100: split-K / split-M aim here for small problems
_FILL_CTAS = 132        # a GEMM grid smaller than this leaves SMs of an H100 idle: split K up to it
_MIN_SPLIT_K_BLOCKS = 4  # each K-split of a GEMM runs at least this many BLOCK_K steps (pipeline depth)


def _gemm_class(M: int) -> str:
    return "small" if M <= 16 else "medium" if M <= 512 else "large"


def shipped_configs(table: dict, M: int, *key) -> list[tuple]:
    """The configs of a {(M class, *key): config} table for M rows: the launcher's pick for (class of M, *key)
    first, then the other configs of the same key a tuner may time (each is correct for every shape; the AOT
    check compiles them all), each once."""
    pick = table[(_gemm_class(M), *key)]
    others = [c for (_, *k), c in table.items() if tuple(k) == key and c != pick]
    return [pick] + sorted(set(others), key=others.index)


def gemm_configs(M: int, elem_size: int, dropout: bool) -> list[tuple]:
    """The shipped GEMM tile configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for M rows of
    `elem_size`-byte activations, dropout in the epilogue or not (`shipped_configs`)."""
    return shipped_configs(_GEMM_CONFIGS, M, elem_size, dropout)


def gemm_split_k(M: int, N: int, K: int, config: tuple) -> int:
    """K-splits of the fused GEMM: enough for _FILL_CTAS programs when the output has fewer tiles, each
    split at least _MIN_SPLIT_K_BLOCKS steps long."""
    bm, bn, bk = config[:3]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if tiles == 0 or tiles >= _FILL_CTAS:
        return 1
    return max(1, min(triton.cdiv(_FILL_CTAS, tiles), triton.cdiv(K, bk * _MIN_SPLIT_K_BLOCKS)))


def _ranges(blocks: int, splits: int):
    """(blocks per range, ranges): `blocks` cut into at least `splits` ranges when there are that many
    blocks, every range but the last full, none empty."""
    per = max(1, blocks // max(splits, 1))
    return per, max(1, triton.cdiv(blocks, per))


def _block_r(R: int) -> int:
    # One program covers ranks up to 64 (one pass over its input); tl.dot needs dims >= 16 on a GPU.
    return 16 if R <= 16 else 64


def _lora_warps(x_elem_size: int, lora_elem_size: int) -> int:
    # 16-bit x with float32 adapters: tf32 dots on float32 operand tiles. At 4 warps ptxas spilled address
    # registers of the shrink and dA kernels (8-32 B of stack at ~96 registers); 8 warps share the tiles.
    return 8 if x_elem_size == 2 and lora_elem_size == 4 else 4


def _shrink_blocks(M: int, elem_size: int, R: int, lora_elem_size: int | None = None):
    """(BLOCK_M, BLOCK_K, num_warps) of the shrink kernel: x tiles whose dropout mask and dot fit in registers."""
    lora_elem_size = lora_elem_size or elem_size
    warps = _lora_warps(elem_size, lora_elem_size)
    if M <= 16:
        # A [128, 64] float32 A tile beside the x tile took all 255 registers: 64-wide K steps there.
        return 16, (128 if elem_size == 2 and (R <= 16 or lora_elem_size == 2) else 64), warps
    if elem_size == 2:
        return 64, (64 if R <= 16 else 32), warps
    return (32 if R <= 16 else 16), 32, warps


def shrink_split_k(M: int, K: int, R: int, x_elem_size: int, lora_elem_size: int | None = None) -> int:
    """Split the K reduction when there are too few row-blocks to occupy the GPU (decode sizes)."""
    block_m, block_k, _ = _shrink_blocks(M, x_elem_size, R, lora_elem_size)
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, _block_r(R))
    return max(1, min(triton.cdiv(K, block_k), _TARGET_PROGRAMS // max(programs, 1)))


def _ds_db_blocks(elem_size: int, block_r: int, lora_elem_size: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the dS/dB kernel. A program keeps its [BLOCK_N, BLOCK_R] dB tile and
    the matching B tile in registers while it walks M. Every [BLOCK_M, BLOCK_N] tile of G sends its
    [BLOCK_M, BLOCK_R] float32 dS partial to memory, 2·R/BLOCK_N of G's bytes for 16-bit G, hence wide
    BLOCK_N. float32 adapters (tf32 dots) and rank 64 take 32-row steps on 8 warps: 64 x 128 at rank 16
    took 182 registers at 8 warps on sm_90 (one CTA per SM), 32 x 128 takes 124 (two)."""
    if elem_size == 2:
        return (64, 128, 4) if block_r == 16 and lora_elem_size == 2 else (32, 128, 8)
    return (32, 64, 4) if block_r == 16 else (16, 64, 4)


def ds_db_split_m(M: int, N: int, R: int, g_elem_size: int, lora_elem_size: int) -> int:
    """M-ranges of the dS/dB kernel: the n-blocks alone are too few programs for small `out`."""
    block_m, block_n, _ = _ds_db_blocks(g_elem_size, _block_r(R), lora_elem_size)
    programs = triton.cdiv(N, block_n) * triton.cdiv(R, _block_r(R))
    return max(1, min(triton.cdiv(M, block_m), triton.cdiv(_TARGET_PROGRAMS, max(programs, 1))))


def _da_blocks(elem_size: int, R: int):
    """(BLOCK_M, BLOCK_K) of the dA kernel."""
    if elem_size == 2:
        return 64, (64 if R <= 16 else 32)
    # float32 x: FMA dots, operands in registers; a 32-row step beside 64 ranks took 255 registers (sm_80).
    return (32 if R <= 16 else 16), 32


def da_split_m(M: int, K: int, R: int, x_elem_size: int) -> int:
    """Split the M reduction of dA = dSᵀ x̂ so that the few column blocks still fill the GPU."""
    block_m, block_k = _da_blocks(x_elem_size, R)
    programs = triton.cdiv(K, block_k) * triton.cdiv(R, _block_r(R))
    return max(1, min(triton.cdiv(M, block_m), _TARGET_PROGRAMS // max(programs, 1)))


def _compute_types(x_dtype: torch.dtype, lora_dtype: torch.dtype):
    """(base compute type, LoRA compute type, fp32 dot precision)."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    base = dot_type(x_dtype)
    lora = dot_type(x_dtype) if lora_dtype == x_dtype else tl.float32
    # fp32 dots: exact ("ieee") for fp32 activations unless the user allowed tf32 as for torch.matmul;
    # tf32 for 16-bit activations mixed with fp32 adapters (the activations' 8-11 bit mantissa dominates).
    precision = "tf32" if (allow_tf32 or x_dtype != torch.float32) else "ieee"
    return base, lora, precision


def _dropout_args(dropout_p: float, seed: int | None):
    """(seed, drop_threshold, keep_scale); threshold 0 switches dropout off inside the kernels."""
    if seed is None:
        return SEED_LOW, 0, 1.0
    return seed, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _alloc(shape, dtype, device, zero=False):
    if zero:
        return torch.zeros(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Plans: the launches for given tensors, outputs allocated on their device (meta tensors work: the AOT
# check compiles exactly these). `deterministic` plans contain no atomic adds (tests check the IR).
# --------------------------------------------------------------------------------------------------

def _split_output(splits: int, shape, dtype, device, deterministic: bool):
    """Where `splits` programs that each reduce part of an output of `shape` put their sums.

    Returns (out, target, split_stride, atomic, finish): the programs of split j write at target +
    j·split_stride (with target's 2-D strides), adding atomically when `atomic`; the `finish` launches
    then produce `out`. One split stores into `out`; several add into a zeroed float32 buffer (cast to
    `dtype` after), or, when deterministic, store partials into a [splits, *shape] float32 workspace
    that one launch sums in a fixed order.
    """
    if splits == 1:
        out = _alloc(shape, dtype, device)
        return out, out, 0, False, []
    if not deterministic:
        acc = _alloc(shape, torch.float32, device, zero=True)
        if dtype == torch.float32:
            return acc, acc, 0, True, []
        out = _alloc(shape, dtype, device)
        return out, acc, 0, True, [sum_launch(acc, out, 1)]
    ws = _alloc((splits, *shape), torch.float32, device)
    out = _alloc(shape, dtype, device)
    return out, ws.select(0, 0), out.numel(), False, [sum_launch(ws, out, splits)]


def _shrink_plan(x, A, scale, dropout_p, seed, deterministic: bool, A_is_rk=True):
    """(launches, S [M, R] float32 = scale · x̂ Aᵀ). A: [R, K], or with A_is_rk=False a [K, R] matrix whose
    transpose is used (dS = s · G B in the deterministic backward)."""
    M, K = x.shape
    a_rk = A if A_is_rk else A.t()
    R = a_rk.shape[0]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    _, ct, precision = _compute_types(x.dtype, A.dtype)
    block_m, block_k, warps = _shrink_blocks(M, x.element_size(), R, A.element_size())
    block_r = _block_r(R)
    split = shrink_split_k(M, K, R, x.element_size(), A.element_size())
    blocks_per_split, split = _ranges(triton.cdiv(K, block_k), split)
    k_per_split = blocks_per_split * block_k
    S, target, stride_ss, atomic, finish = _split_output(split, (M, R), torch.float32, x.device, deterministic)
    launch = Launch(
        _lora_shrink_kernel, (triton.cdiv(M, block_m), triton.cdiv(R, block_r), split),
        dict(x_ptr=x, a_ptr=a_rk, s_ptr=target, M=M, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1),
             stride_ar=a_rk.stride(0), stride_ak=a_rk.stride(1), stride_sm=target.stride(0),
             stride_sr=target.stride(1), stride_ss=stride_ss, seed=seed, drop_threshold=thr,
             scale=float(scale) * keep_scale, k_per_split=k_per_split),
        dict(HAS_DROPOUT=thr > 0, ATOMIC=atomic, CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k,
             BLOCK_R=block_r),
        num_warps=warps, num_stages=3)
    return [launch] + finish, S


def _gemm_plan(P, Q_kn, bias, L, E_rn, out_shape, lora_scale, dropout_p, seed, lora_dtype, config=None):
    """(launches, out = P @ Q_kn (+ bias) + lora_scale · L @ E_rn [dropout]) in P's dtype; Q_kn / E_rn are
    (strided) views. `config` overrides the tile config (one of gemm_configs())."""
    M, K = P.shape
    N = out_shape[1]
    R = L.shape[1]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    # The epilogue's LoRA dot runs in the output's own type (y and dx are stored in x's dtype anyway);
    # tf32 operands for fp32 adapters cost registers that spill the 128x128 tile on sm_90.
    ct, _, precision = _compute_types(P.dtype, lora_dtype)
    config = config or gemm_configs(M, P.element_size(), dropout=thr > 0)[0]
    bm, bn, bk, group_m, warps, stages = config
    split = gemm_split_k(M, N, K, config)
    blocks_per_split, split = _ranges(triton.cdiv(K, bk), split)
    k_per_split = blocks_per_split * bk
    # Split partials go to a workspace, never atomics: the output is 16-bit, and the sum is reproducible.
    out, target, stride_os, _, finish = _split_output(split, out_shape, P.dtype, P.device, True)
    launch = Launch(
        _gemm_lora_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn), split),
        dict(p_ptr=P, q_ptr=Q_kn, bias_ptr=bias if bias is not None else target, l_ptr=L, e_ptr=E_rn,
             out_ptr=target, M=M, N=N, K=K, R=R, stride_pm=P.stride(0), stride_pk=P.stride(1),
             stride_qk=Q_kn.stride(0), stride_qn=Q_kn.stride(1),
             stride_bias=bias.stride(0) if bias is not None else 0, stride_lm=L.stride(0), stride_lr=L.stride(1),
             stride_er=E_rn.stride(0), stride_en=E_rn.stride(1), stride_om=target.stride(0),
             stride_on=target.stride(1), stride_os=stride_os, has_bias=int(bias is not None),
             lora_scale=float(lora_scale), seed=seed, drop_threshold=thr, keep_scale=keep_scale,
             k_per_split=k_per_split),
        dict(HAS_DROPOUT=thr > 0, CT=ct, PRECISION=precision, BLOCK_M=bm,
             BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_EPILOGUE_BLOCK_R, GROUP_M=group_m),
        num_warps=warps, num_stages=stages)
    return [launch] + finish, out


def _expand_launch(L, E_rn, out, lora_scale, dropout_p, seed, lora_dtype) -> Launch:
    """out += lora_scale · L @ E_rn [⊙ m / (1-p) over out's (row, col)], in place."""
    M, N = out.shape
    R = L.shape[1]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    # Memory-bound: the LoRA dot runs in the adapters' type (no tile that registers could not hold).
    _, ct, precision = _compute_types(out.dtype, lora_dtype)
    bm = 16 if M <= 16 else 32
    bn = 128 if out.element_size() == 2 else 64
    return Launch(
        _lora_expand_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
        dict(l_ptr=L, e_ptr=E_rn, out_ptr=out, M=M, N=N, R=R, stride_lm=L.stride(0), stride_lr=L.stride(1),
             stride_er=E_rn.stride(0), stride_en=E_rn.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
             lora_scale=float(lora_scale), seed=seed, drop_threshold=thr, keep_scale=keep_scale),
        dict(HAS_DROPOUT=thr > 0, CT=ct, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn,
             BLOCK_R=_EPILOGUE_BLOCK_R),
        num_warps=4, num_stages=2)


def _ds_db_plan(G, B, S, scaling, need_dS: bool, need_dB: bool, deterministic: bool):
    """(launches, dS [M, R] float32 or None, dB [out, R] in B's dtype or None).

    With dB wanted and atomics allowed, one pass over G computes both (the dS partials of the n-blocks
    added atomically). Deterministic: dS by the shrink kernel (G Bᵀᵀ, K-split partials summed in order),
    dB by the same kernel without dS: two passes over G, workspaces of split·(M + out)·R floats."""
    M, N = G.shape
    R = B.shape[1]
    launches, dS, dB = [], None, None
    fused = need_dS and need_dB and not deterministic
    if need_dS and not fused:
        launches, dS = _shrink_plan(G, B, scaling, 0.0, None, deterministic, A_is_rk=False)
    if not need_dB:
        return launches, dS, None
    _, ct, precision = _compute_types(G.dtype, B.dtype)
    block_r = _block_r(R)
    block_m, block_n, warps = _ds_db_blocks(G.element_size(), block_r, B.element_size())
    num_m, num_n = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    split = ds_db_split_m(M, N, R, G.element_size(), B.element_size())
    per_split = triton.cdiv(num_m, split) if num_m else 1  # full ranges: each ends with a dB flush
    split = max(1, triton.cdiv(num_m, per_split))
    dB, db_target, stride_dbs, db_atomic, finish = _split_output(split, (N, R), B.dtype, G.device, deterministic)
    ds_atomic = False
    if fused:
        dS, _, _, ds_atomic, _ = _split_output(num_n, (M, R), torch.float32, G.device, False)
    ds_target = dS if fused else db_target  # unused without dS
    launches.append(Launch(
        _lora_bwd_ds_db_kernel, (num_n, triton.cdiv(R, block_r), split),
        dict(g_ptr=G, b_ptr=B, s_ptr=S, ds_ptr=ds_target, db_ptr=db_target, M=M, N=N, R=R,
             stride_gm=G.stride(0), stride_gn=G.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1),
             stride_sm=S.stride(0), stride_sr=S.stride(1), stride_dsm=ds_target.stride(0),
             stride_dsr=ds_target.stride(1), stride_dbn=db_target.stride(0), stride_dbr=db_target.stride(1),
             stride_dbs=stride_dbs, scaling=float(scaling), m_blocks_per_split=per_split),
        dict(COMPUTE_DS=fused, DS_ATOMIC=ds_atomic, DB_ATOMIC=db_atomic, CT=ct, PRECISION=precision,
             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r),
        num_warps=warps, num_stages=3))
    return launches + finish, dS, dB


def _da_plan(dS, x, A, dropout_p, seed, deterministic: bool):
    """(launches, dA [R, in] in A's dtype = dSᵀ x̂)."""
    M, K = x.shape
    R = dS.shape[1]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    _, ct, precision = _compute_types(x.dtype, A.dtype)
    block_r = _block_r(R)
    block_m, block_k = _da_blocks(x.element_size(), R)
    split = da_split_m(M, K, R, x.element_size())
    dA, target, stride_das, atomic, finish = _split_output(split, (R, K), A.dtype, x.device, deterministic)
    launch = Launch(
        _lora_bwd_da_kernel, (triton.cdiv(K, block_k), triton.cdiv(R, block_r), split),
        dict(ds_ptr=dS, x_ptr=x, da_ptr=target, M=M, K=K, R=R, stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
             stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dar=target.stride(0),
             stride_dak=target.stride(1), stride_das=stride_das, seed=seed, drop_threshold=thr,
             keep_scale=keep_scale),
        dict(HAS_DROPOUT=thr > 0, ATOMIC=atomic, CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k,
             BLOCK_R=block_r),
        num_warps=_lora_warps(x.element_size(), A.element_size()), num_stages=3)
    return [launch] + finish, dA


def plan_fwd(x, weight, bias, A, B, scaling, dropout_p, seed, deterministic: bool = False, gemm_config=None):
    """(launches, y [M, out] in x's dtype, S [M, r] float32) of the fused forward."""
    launches, S = _shrink_plan(x, A, 1.0, dropout_p, seed, deterministic)
    # y = x W0ᵀ + b + s · S Bᵀ; no dropout on the base path, so the epilogue takes no mask.
    gemm, y = _gemm_plan(x, weight.t(), bias, S, B.t(), (x.shape[0], weight.shape[0]), scaling, 0.0, None,
                         A.dtype, gemm_config)
    return launches + gemm, y, S


def plan_bwd(G, x, weight, A, B, S, scaling, dropout_p, seed, need_dx: bool, need_dA: bool, need_dB: bool,
             deterministic: bool = False, gemm_config=None):
    """(launches, dx, dA, dB) of the fused backward, each output None when not needed."""
    launches, dS, dB = _ds_db_plan(G, B, S, scaling, need_dx or need_dA, need_dB, deterministic)
    dx = dA = None
    if need_dx:
        # dx = G W0 + (dS A) ⊙ m/(1-p): the same GEMM kernel, reduction over `out`, epilogue L = dS, E = A.
        gemm, dx = _gemm_plan(G, weight, None, dS, A, tuple(x.shape), 1.0, dropout_p, seed, A.dtype, gemm_config)
        launches += gemm
    if need_dA:
        da, dA = _da_plan(dS, x, A, dropout_p, seed, deterministic)
        launches += da
    return launches, dx, dA, dB


def plan_fwd_composite(x, A, B, y, scaling, dropout_p, seed, deterministic: bool = False):
    """(launches, S) that turn y = x W0ᵀ + b (computed by the caller, cuBLAS) into the LoRA linear's y."""
    launches, S = _shrink_plan(x, A, 1.0, dropout_p, seed, deterministic)
    return launches + [_expand_launch(S, B.t(), y, scaling, 0.0, None, A.dtype)], S


def plan_bwd_composite(G, x, A, B, S, dx, scaling, dropout_p, seed, need_dA: bool, need_dB: bool,
                       deterministic: bool = False):
    """(launches, dA, dB) of the composite backward; dx (None when not needed) holds G W0 (cuBLAS) and gets
    the LoRA term added in place."""
    launches, dS, dB = _ds_db_plan(G, B, S, scaling, dx is not None or need_dA, need_dB, deterministic)
    if dx is not None:
        launches.append(_expand_launch(dS, A, dx, 1.0, dropout_p, seed, A.dtype))
    dA = None
    if need_dA:
        da, dA = _da_plan(dS, x, A, dropout_p, seed, deterministic)
        launches += da
    return launches, dA, dB


# --------------------------------------------------------------------------------------------------
# Launchers called by the registered ops (lora_kernels/ops/lora_linear.py). Inputs are checked there.
# --------------------------------------------------------------------------------------------------

def _run(launches) -> None:
    for launch in launches:
        launch.run()


def lora_linear_fwd_triton(x, weight, bias, A, B, scaling, dropout_p, seed, gemm_config=None):
    """(y [M, out] in x's dtype, S [M, r] float32) for 2-D x; `gemm_config` one of gemm_configs()."""
    launches, y, S = plan_fwd(x, weight, bias, A, B, scaling, dropout_p, seed,
                              torch.are_deterministic_algorithms_enabled(), gemm_config)
    _run(launches)
    return y, S


def lora_linear_bwd_triton(dy, x, weight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                           gemm_config=None):
    """(dx, dA, dB), each None when not needed, each in its tensor's dtype."""
    launches, dx, dA, dB = plan_bwd(dy.to(x.dtype), x, weight, A, B, S, scaling, dropout_p, seed, need_dx,
                                    need_dA, need_dB, torch.are_deterministic_algorithms_enabled(), gemm_config)
    _run(launches)
    return dx, dA, dB


def lora_linear_fwd_composite(x, weight, bias, A, B, scaling, dropout_p, seed):
    """As lora_linear_fwd_triton, with the base GEMM by torch (cuBLAS on a GPU) and the LoRA term added
    into its output by _lora_expand_kernel: the safe default that needs no tuning."""
    y = torch.nn.functional.linear(x, weight, bias)
    launches, S = plan_fwd_composite(x, A, B, y, scaling, dropout_p, seed,
                                     torch.are_deterministic_algorithms_enabled())
    _run(launches)
    return y, S


def lora_linear_bwd_composite(dy, x, weight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    """As lora_linear_bwd_triton, with dx = G W0 by torch.mm (cuBLAS on a GPU) plus the expand kernel."""
    G = dy.to(x.dtype)
    dx = torch.mm(G, weight) if need_dx else None
    launches, dA, dB = plan_bwd_composite(G, x, A, B, S, dx, scaling, dropout_p, seed, need_dA, need_dB,
                                          torch.are_deterministic_algorithms_enabled())
    _run(launches)
    return dx, dA, dB
