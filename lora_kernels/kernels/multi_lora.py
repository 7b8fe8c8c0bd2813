"""Triton kernels for multi-adapter LoRA serving (semantics in lora_kernels/ops/multi_lora.py).

    shrink  S[t, i·R + j] = x[t] · A_i[l, j]                     _multi_lora_shrink_kernel
    expand  y[t, c_i + n] += s_l · Σ_j S[t, i·R + j] B_i[l, n, j]  _multi_lora_expand_kernel
    fused   y = x W0ᵀ + b + expand                                _multi_lora_gemm_kernel

One design for prefill and decode, driven by the LoRABatch metadata and never by host reads:

* shrink / expand walk *segment tiles*: up to BLOCK_M consecutive tokens (in sorted order) of one slot.
  A long prefill segment becomes full tiles, a grouped GEMM per slot (SGMV); a decode batch whose
  tokens all use different slots becomes one-token tiles, each a gather of its slot's weights (BGMV).
  The grid is sized by the tile bound NT = cdiv(T, BLOCK_M) + min(L, T); unused tiles exit at once, and
  `-1` tokens and empty slots have no tile. The shrink splits K across programs (fp32 atomics into a
  zeroed S) when there are few tiles, so a decode step still has enough programs to stream A at full
  bandwidth; the expand reads y once and writes it once per element.
* the fused GEMM tiles the output over *all* tokens in sorted order (full tiles for the base GEMM,
  gathering x rows and scattering y rows through sorted_token_ids) and, in the epilogue, loops over the
  distinct slots present in the tile (one for nearly every prefill tile), adding s_l · S B_lᵀ for the rows
  of each; tiles of `-1` tokens skip the loop.

Heterogeneous ranks are masks over the padded R (r-blocks at or beyond a slot's rank do nothing).
Several output slices (a fused QKV or gate/up layer, slices of different widths) run in one launch: up
to MAX_SLICES stacks per launch are passed as separate pointers and selected by constexpr-unrolled
branches. Every element offset is 64-bit. Accumulation is fp32; tl.dot needs every dim >= 16 on a GPU,
so BLOCK_R >= 16 with masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.kernels._common import dot_type, grouped_tile, mma
from lora_kernels.kernels._launch import Launch
from lora_kernels.ops.multi_lora import num_tiles, tile_block_m

# Tests set this to fill every output buffer the kernels must fully write with NaN: unwritten elements fail.
POISON_OUTPUTS = False

MAX_SLICES = 4  # slice stacks per launch; more slices take more launches


@triton.jit
def _slot_rank(ranks_ptr, slot, R, HAS_RANKS: tl.constexpr):
    """r_l = clamp(ranks[slot], 0, R) (R without a ranks tensor); slot must be >= 0."""
    if HAS_RANKS:
        return tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)
    else:
        return R


# --------------------------------------------------------------------------------------------------
# shrink
# --------------------------------------------------------------------------------------------------

@triton.jit
def _shrink_slice(x_ptr, a_ptr, s_ptr, toks, mask_m, slot, rank, r0, s_col0, k_first, K, split_k,
                  stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
                  CT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[toks, s_col0 + r0 + j] += x[toks, k-range] · A[slot, r0 + j, k-range] for r0 + j < rank."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_al
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_first, K, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + toks[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_base + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None],
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc = mma(x, a, acc, CT, PRECISION)
    # S starts zeroed; atomics let split-K programs (and nothing else) share an element.
    tl.atomic_add(s_ptr + toks[:, None] * stride_sm + (s_col0 + offs_r)[None, :].to(tl.int64) * stride_sr, acc,
                  mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, s_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr,
    K, R, num_slices, slice_base, split_k,
    stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
    HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (NT tiles, num_slices · r-blocks · split_k). A stacks contiguous [L, R, K]; S [T, *] float32."""
    pid_t = tl.program_id(0)
    pid_z = tl.program_id(1)
    num_rb = tl.cdiv(R, BLOCK_R)
    ks = pid_z % split_k
    rb = (pid_z // split_k) % num_rb
    s = pid_z // (split_k * num_rb)
    slot = tl.load(tile_slot_ptr + pid_t)
    rank = _slot_rank(ranks_ptr, tl.maximum(slot, 0), R, HAS_RANKS)
    r0 = rb * BLOCK_R
    # Unused tiles, and r-blocks beyond this slot's rank, do nothing.
    if (slot >= 0) & (r0 < rank) & (s < num_slices):
        start = tl.load(tile_start_ptr + pid_t)
        end = tl.load(tile_end_ptr + pid_t)
        pos = start + tl.arange(0, BLOCK_M)
        mask_m = pos < end
        toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        s_col0 = (slice_base + s) * R
        k_first = ks * BLOCK_K
        if s == 0:
            _shrink_slice(x_ptr, a0_ptr, s_ptr, toks, mask_m, slot, rank, r0, s_col0, k_first, K, split_k,
                          stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
                          CT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
        if NUM_SLICES > 1:
            if s == 1:
                _shrink_slice(x_ptr, a1_ptr, s_ptr, toks, mask_m, slot, rank, r0, s_col0, k_first, K, split_k,
                              stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
                              CT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
            if s == 2:
                _shrink_slice(x_ptr, a2_ptr, s_ptr, toks, mask_m, slot, rank, r0, s_col0, k_first, K, split_k,
                              stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
                              CT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
            if s == 3:
                _shrink_slice(x_ptr, a3_ptr, s_ptr, toks, mask_m, slot, rank, r0, s_col0, k_first, K, split_k,
                              stride_xm, stride_xk, stride_al, stride_ar, stride_sm, stride_sr,
                              CT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)


# --------------------------------------------------------------------------------------------------
# expand (shared by the expand kernel and the fused GEMM's epilogue)
# --------------------------------------------------------------------------------------------------

@triton.jit
def _expand_slice(acc, s_ptr, b_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, col0, N_i, R, s_col0,
                  stride_sm, stride_sr, CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """acc[m, :] += scale · S[toks[m], s_col0 + :rank] · B[slot, offs_n - col0, :rank]ᵀ for `rows`, on the
    columns of this tile that fall in the slice [col0, col0 + N_i). B is a contiguous [L, N_i, R] stack."""
    # Padding slices (N_i = 0) and slices outside this tile's columns read nothing.
    if (N_i > 0) & (col0 < n_lo + BLOCK_N) & (col0 + N_i > n_lo):
        n_local = offs_n - col0
        mask_n = (n_local >= 0) & (n_local < N_i)
        b_base = b_ptr + slot.to(tl.int64) * N_i * R
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            s = tl.load(s_ptr + toks[:, None] * stride_sm + (s_col0 + offs_r)[None, :].to(tl.int64) * stride_sr,
                        mask=rows[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_base + n_local[None, :] * R + offs_r[:, None],
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = mma(s * scale, b, acc, CT, PRECISION)
    return acc


@triton.jit
def _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, rows, slot, rank, scale,
                   offs_n, n_lo, R, slice_base, stride_sm, stride_sr,
                   NUM_SLICES: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """All slices of one launch; slice i's columns start at Σ_{k<i} N_k (tile columns offs_n)."""
    acc = _expand_slice(acc, s_ptr, b0_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, 0, N0, R,
                        slice_base * R, stride_sm, stride_sr, CT, PRECISION, BLOCK_N, BLOCK_R)
    if NUM_SLICES > 1:
        acc = _expand_slice(acc, s_ptr, b1_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, N0, N1, R,
                            (slice_base + 1) * R, stride_sm, stride_sr, CT, PRECISION, BLOCK_N, BLOCK_R)
        acc = _expand_slice(acc, s_ptr, b2_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, N0 + N1, N2, R,
                            (slice_base + 2) * R, stride_sm, stride_sr, CT, PRECISION, BLOCK_N, BLOCK_R)
        acc = _expand_slice(acc, s_ptr, b3_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, N0 + N1 + N2, N3, R,
                            (slice_base + 3) * R, stride_sm, stride_sr, CT, PRECISION, BLOCK_N, BLOCK_R)
    return acc


@triton.jit
def _multi_lora_expand_kernel(
    s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, y_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr, scalings_ptr,
    N0, N1, N2, N3, R, slice_base, y_col0,
    stride_sm, stride_sr, stride_ym, stride_yn,
    HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid (NT tiles, cdiv(Σ N_i, BLOCK_N)). y[toks, y_col0 + n] += the tile's LoRA term, read and written once."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + pid_t)
    slot_c = tl.maximum(slot, 0)
    rank = _slot_rank(ranks_ptr, slot_c, R, HAS_RANKS)
    if (slot >= 0) & (rank > 0):
        scale = tl.load(scalings_ptr + slot_c)
        start = tl.load(tile_start_ptr + pid_t)
        end = tl.load(tile_end_ptr + pid_t)
        pos = start + tl.arange(0, BLOCK_M)
        mask_m = pos < end
        toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        n_lo = pid_n.to(tl.int64) * BLOCK_N
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        N = N0 + N1 + N2 + N3
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, mask_m, slot, rank,
                             scale, offs_n, n_lo, R, slice_base, stride_sm, stride_sr,
                             NUM_SLICES, CT, PRECISION, BLOCK_N, BLOCK_R)
        y_ptrs = y_ptr + toks[:, None] * stride_ym + (y_col0 + offs_n)[None, :] * stride_yn
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# fused base GEMM + expand epilogue
# --------------------------------------------------------------------------------------------------

@triton.jit
def _multi_lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, y_ptr,
    token_adapter_ptr, sorted_ids_ptr, ranks_ptr, scalings_ptr,
    T, N, N0, N1, N2, N3, K, R, L,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, CT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[T, N] = x W0ᵀ + b + Σ_{slots l in the tile} s_l · S[rows of l] B_lᵀ over tokens in sorted order.

    Grid (cdiv(T, BLOCK_M) · cdiv(N, BLOCK_N),). The epilogue covers slices N0..N3 (columns [0, Σ N_i)).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = pos < T
    toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64)
    n_lo = pid_n.to(tl.int64) * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + toks[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(x, w, acc, CT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # Epilogue: the distinct slots of this tile in ascending order (key L = no adapter ends the loop).
    key = tl.load(token_adapter_ptr + toks, mask=mask_m, other=-1)
    key = tl.where((key >= 0) & (key < L), key, L)
    cur = tl.min(key, axis=0)
    while cur < L:
        rank = _slot_rank(ranks_ptr, cur, R, HAS_RANKS)
        scale = tl.load(scalings_ptr + cur)
        acc = _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, key == cur, cur,
                             rank, scale, offs_n, n_lo, R, 0, stride_sm, stride_sr,
                             NUM_SLICES, CT, PRECISION, BLOCK_N, BLOCK_R)
        cur = tl.min(tl.where(key > cur, key, L), axis=0)
    tl.store(y_ptr + toks[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# Configs. No GPU was available to tune these; they are sized so that every one compiles for sm_80 and
# sm_90 without register spills (aot_launches below; tests/test_aot.py checks both).
# --------------------------------------------------------------------------------------------------

_TARGET_PROGRAMS = 528  # ~4 programs per SM on a 132-SM H100: enough bytes in flight for a GEMV-like shrink

# Fused GEMM (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by T and x's element size.
# fp32 ("ieee" dots run on FMAs with operands in registers) needs smaller tiles than the MMA dtypes;
# (64, 128, 32) with 8 warps was the variant without ptxas spills in all four bias/slice variants.
_GEMM_CONFIGS = {
    # T <= 16: a GEMV streaming W0 once over many narrow column blocks. (BLOCK_N=64 left ptxas spilling
    # one register, 8 B of stack, on sm_90 with 4 slices.)
    ("small", 2): (16, 32, 128, 1, 4, 4),
    ("small", 4): (16, 32, 64, 1, 4, 3),
    ("medium", 2): (64, 64, 128, 8, 4, 3),    # T <= 64
    ("medium", 4): (64, 128, 32, 8, 8, 3),
    ("large", 2): (128, 128, 64, 8, 8, 3),
    ("large", 4): (64, 128, 32, 8, 8, 3),
}


def _gemm_config(T: int, elem_size: int):
    return _GEMM_CONFIGS[("small" if T <= 16 else "medium" if T <= 64 else "large", elem_size)]


def _shrink_block_r(R: int) -> int:
    # One r-block covers R <= 64 (x read once per tile); tl.dot needs >= 16 on a GPU.
    return 16 if R <= 16 else 64


_EXPAND_BLOCK_R = 16  # the expand loops over 16-wide rank chunks, so one config serves every rank


def _shrink_block_k(elem_size: int, block_r: int) -> int:
    # 16-bit: 256 B of each x row per iteration, half that beside a 64-wide A tile (246 registers on
    # sm_80 otherwise). fp32: 32 (its FMA dots spilled at 64).
    if elem_size == 4:
        return 32
    return 128 if block_r == 16 else 64


def _shrink_warps(elem_size: int, block_r: int) -> int:
    return 8 if (elem_size == 4 and block_r == 64) else 4


def _compute_type(dtype: torch.dtype):
    """(tl compute type, fp32 dot precision)."""
    ct = dot_type(dtype)
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return ct, precision


def shrink_split_k(T: int, num_slots: int, K: int, R: int, num_slices: int, elem_size: int) -> int:
    """Split the K reduction when the tiles are too few to occupy the GPU (decode). A power of two."""
    nt = num_tiles(T, num_slots)
    programs = max(1, nt * num_slices * triton.cdiv(R, _shrink_block_r(R)))
    split = 1
    block_k = _shrink_block_k(elem_size, _shrink_block_r(R))
    while split * 2 * programs <= _TARGET_PROGRAMS and split * 2 <= triton.cdiv(K, block_k):
        split *= 2
    return split


def _pad_slices(stacks: list) -> list:
    return stacks + [stacks[0]] * (MAX_SLICES - len(stacks))


def _chunks(stacks: list):
    for i in range(0, len(stacks), MAX_SLICES):
        yield i, stacks[i:i + MAX_SLICES]


# --------------------------------------------------------------------------------------------------
# Plans: the launches for given tensors (meta tensors work: the AOT tests compile exactly these).
# --------------------------------------------------------------------------------------------------

def plan_shrink(x, A_stacks, S, bt, ranks, split_k: int) -> list[Launch]:
    T, K = x.shape
    L, R, _ = A_stacks[0].shape
    ct, precision = _compute_type(x.dtype)
    block_r = _shrink_block_r(R)
    block_m = tile_block_m(T)
    _, sid, _, _, tsl, tst, ten = bt
    launches = []
    for base, chunk in _chunks(A_stacks):
        a = _pad_slices(chunk)
        ns = len(chunk)
        launches.append(Launch(
            _multi_lora_shrink_kernel, (tsl.shape[0], ns * triton.cdiv(R, block_r) * split_k),
            dict(x_ptr=x, a0_ptr=a[0], a1_ptr=a[1], a2_ptr=a[2], a3_ptr=a[3], s_ptr=S,
                 sorted_ids_ptr=sid, tile_slot_ptr=tsl, tile_start_ptr=tst, tile_end_ptr=ten,
                 ranks_ptr=ranks if ranks is not None else tsl,
                 K=K, R=R, num_slices=ns, slice_base=base, split_k=split_k,
                 stride_xm=x.stride(0), stride_xk=x.stride(1), stride_al=R * K, stride_ar=K,
                 stride_sm=S.stride(0), stride_sr=S.stride(1)),
            dict(HAS_RANKS=ranks is not None, NUM_SLICES=1 if ns == 1 else MAX_SLICES, CT=ct, PRECISION=precision,
                 BLOCK_M=block_m, BLOCK_K=_shrink_block_k(x.element_size(), block_r), BLOCK_R=block_r),
            num_warps=_shrink_warps(x.element_size(), block_r), num_stages=3))
    return launches


def _expand_launch(S, chunk, base, y, y_col0, bt, scalings, ranks) -> Launch:
    T = y.shape[0]
    R = chunk[0].shape[2]
    ct, precision = _compute_type(y.dtype)
    b = _pad_slices(chunk)
    widths = [c.shape[1] for c in chunk] + [0] * (MAX_SLICES - len(chunk))
    block_n = 128 if y.element_size() == 2 else 64
    _, sid, _, _, tsl, tst, ten = bt
    return Launch(
        _multi_lora_expand_kernel, (tsl.shape[0], triton.cdiv(sum(widths), block_n)),
        dict(s_ptr=S, b0_ptr=b[0], b1_ptr=b[1], b2_ptr=b[2], b3_ptr=b[3], y_ptr=y,
             sorted_ids_ptr=sid, tile_slot_ptr=tsl, tile_start_ptr=tst, tile_end_ptr=ten,
             ranks_ptr=ranks if ranks is not None else tsl, scalings_ptr=scalings,
             N0=widths[0], N1=widths[1], N2=widths[2], N3=widths[3], R=R, slice_base=base, y_col0=y_col0,
             stride_sm=S.stride(0), stride_sr=S.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1)),
        dict(HAS_RANKS=ranks is not None, NUM_SLICES=1 if len(chunk) == 1 else MAX_SLICES, CT=ct,
             PRECISION=precision, BLOCK_M=tile_block_m(T), BLOCK_N=block_n, BLOCK_R=_EXPAND_BLOCK_R),
        num_warps=4, num_stages=2)


def plan_expand(S, B_stacks, y, y_offset, bt, scalings, ranks) -> list[Launch]:
    launches, col = [], y_offset
    for base, chunk in _chunks(B_stacks):
        launches.append(_expand_launch(S, chunk, base, y, col, bt, scalings, ranks))
        col += sum(c.shape[1] for c in chunk)
    return launches


def plan_linear(x, weight, bias, S, B_stacks, y, bt, scalings, ranks) -> list[Launch]:
    """The fused GEMM with the first MAX_SLICES slices in its epilogue (+ expand launches for any others)."""
    T, K = x.shape
    R = B_stacks[0].shape[2]
    L = bt[2].shape[0]
    ct, precision = _compute_type(x.dtype)
    bm, bn, bk, group_m, warps, stages = _gemm_config(T, x.element_size())
    first = B_stacks[:MAX_SLICES]
    b = _pad_slices(first)
    widths = [c.shape[1] for c in first] + [0] * (MAX_SLICES - len(first))
    N = sum(widths)  # the GEMM writes all columns; slices past MAX_SLICES get expand launches
    ta, sid = bt[0], bt[1]
    launches = [Launch(
        _multi_lora_gemm_kernel, (triton.cdiv(T, bm) * triton.cdiv(weight.shape[0], bn),),
        dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, s_ptr=S,
             b0_ptr=b[0], b1_ptr=b[1], b2_ptr=b[2], b3_ptr=b[3], y_ptr=y,
             token_adapter_ptr=ta, sorted_ids_ptr=sid, ranks_ptr=ranks if ranks is not None else ta,
             scalings_ptr=scalings, T=T, N=weight.shape[0], N0=widths[0], N1=widths[1], N2=widths[2],
             N3=widths[3], K=K, R=R, L=L,
             stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
             stride_sm=S.stride(0), stride_sr=S.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1)),
        dict(HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None,
             NUM_SLICES=1 if len(first) == 1 else MAX_SLICES, CT=ct, PRECISION=precision,
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_EXPAND_BLOCK_R, GROUP_M=group_m),
        num_warps=warps, num_stages=stages)]
    col = N
    for base, chunk in _chunks(B_stacks[MAX_SLICES:]):
        launches.append(_expand_launch(S, chunk, MAX_SLICES + base, y, col, bt, scalings, ranks))
        col += sum(c.shape[1] for c in chunk)
    return launches


# --------------------------------------------------------------------------------------------------
# Launchers called by the registered ops (lora_kernels/ops/multi_lora.py). Inputs are checked there.
# --------------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _contig(stacks: list) -> list:
    # Slot stacks are long-lived buffers (already contiguous in MultiLoRALinear): this is a no-op there.
    return [t.contiguous() for t in stacks]


def _shrink(x, A_stacks, bt, ranks):
    T, K = x.shape
    L, R, _ = A_stacks[0].shape
    # Zeroed: rows of -1 tokens and columns past a slot's rank stay 0; split-K programs add atomically.
    S = torch.zeros((T, len(A_stacks) * R), dtype=torch.float32, device=x.device)
    split_k = shrink_split_k(T, L, K, R, min(len(A_stacks), MAX_SLICES), x.element_size())
    for launch in plan_shrink(x, A_stacks, S, bt, ranks, split_k):
        launch.run()
    return S


def lora_shrink_triton(x, A_stacks, bt, ranks):
    """S [T, NS·R] float32 for 2-D x and a list of [L, R, in] stacks."""
    return _shrink(x, _contig(A_stacks), bt, _vec(ranks))


def _vec(t):
    # bias / scalings / ranks are read with unit stride.
    return None if t is None else t.contiguous()


def lora_expand_triton(S, B_stacks, bt, y, scalings, ranks, y_offset):
    """y[:, y_offset:] += the grouped expand, in place."""
    if y.shape[0] == 0:
        return
    for launch in plan_expand(S, _contig(B_stacks), y, y_offset, bt, _vec(scalings), _vec(ranks)):
        launch.run()


def multi_lora_linear_triton(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks):
    """y [T, out] = x W0ᵀ + b + grouped LoRA: the shrink, then the GEMM with the expand in its epilogue."""
    T = x.shape[0]
    y = _alloc((T, weight.shape[0]), x.dtype, x.device)
    if T == 0:
        return y
    ranks = _vec(ranks)
    S = _shrink(x, _contig(A_stacks), bt, ranks)
    for launch in plan_linear(x, weight, _vec(bias), S, _contig(B_stacks), y, bt, _vec(scalings), ranks):
        launch.run()
    return y


def aot_launches():
    """Every config the launchers can pick, built from meta tensors, for the ahead-of-time compile test.

    Configs vary by dtype, by T (tile height 16 / 64; fused GEMM small / medium / large), by one vs
    several slices, by rank (shrink BLOCK_R 16 / 64) and by whether ranks/bias are given.
    """
    meta = dict(device="meta")
    i32 = torch.int32
    seen = set()
    K, L = 4096, 64
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for T in (16, 64, 4096):
            for R in (16, 64):
                for widths in ((4096,), (2048, 512, 512)):
                    for flags in (False, True):
                        NT = num_tiles(T, L)
                        bt = (torch.empty(T, dtype=i32, **meta), torch.empty(T, dtype=i32, **meta),
                              torch.empty(L, dtype=i32, **meta), torch.empty(L, dtype=i32, **meta),
                              torch.empty(NT, dtype=i32, **meta), torch.empty(NT, dtype=i32, **meta),
                              torch.empty(NT, dtype=i32, **meta))
                        ranks = torch.empty(L, dtype=i32, **meta) if flags else None
                        x = torch.empty(T, K, dtype=dtype, **meta)
                        N = sum(widths)
                        W = torch.empty(N, K, dtype=dtype, **meta)
                        bias = torch.empty(N, dtype=dtype, **meta) if flags else None
                        A = [torch.empty(L, R, K, dtype=dtype, **meta) for _ in widths]
                        B = [torch.empty(L, n, R, dtype=dtype, **meta) for n in widths]
                        S = torch.empty(T, len(widths) * R, dtype=torch.float32, **meta)
                        y = torch.empty(T, N, dtype=dtype, **meta)
                        sc = torch.empty(L, dtype=torch.float32, **meta)
                        split_k = shrink_split_k(T, L, K, R, len(widths), x.element_size())
                        launches = plan_shrink(x, A, S, bt, ranks, split_k)
                        launches += plan_expand(S, B, y, 0, bt, sc, ranks)
                        launches += plan_linear(x, W, bias, S, B, y, bt, sc, ranks)
                        for launch in launches:
                            key = (launch.describe(), tuple(sorted(launch.signature().items())))
                            if key not in seen:
                                seen.add(key)
                                yield launch
