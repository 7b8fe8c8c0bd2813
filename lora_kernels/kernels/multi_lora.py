"""Triton kernels for multi-adapter LoRA serving (semantics in lora_kernels/ops/multi_lora.py).

    shrink  S[t, i·R + j] = x[t] · A_i[l, j]                     _multi_lora_shrink_kernel
    expand  y[t, c_i + n] += s_l · Σ_j S[t, i·R + j] B_i[l, n, j]  _multi_lora_expand_kernel
    fused   y = x W0ᵀ + b + expand                                _multi_lora_gemm_kernel
    col_scale (HAS_COL_SCALE, DoRA serving): y[t] = g[l_t] ⊙ (x W0ᵀ + expand)[t] + b, g [L + 1, out] float32
            applied in the fused GEMM's epilogue, or by the composite's expand (cuBLAS then leaves out the bias)

Two paths compute multi_lora_linear: `multi_lora_linear_triton` (the shrink, then the fused GEMM with the
expand in its epilogue: y written once) and `multi_lora_linear_composite` (cuBLAS for y = x W0ᵀ + b, then
the shrink and the expand into y in place: needs no tuning, the LoRA work is memory-bound).

One design for prefill and decode, driven by the LoRABatch metadata and never by host reads:

* shrink / expand walk *segment tiles*: up to BLOCK_M consecutive tokens (in sorted order) of one slot.
  A long prefill segment becomes full tiles, a grouped GEMM per slot (SGMV); a decode batch whose
  tokens all use different slots becomes one-token tiles, each a gather of its slot's weights (BGMV).
  The grid is sized by the tile bound NT = cdiv(T, BLOCK_M) + min(L, T); unused tiles exit at once, and
  `-1` tokens and empty slots have no tile. The shrink splits K across programs (relaxed fp32 atomics
  into a zeroed S) when few tiles may do work, so a decode step or a batch on one slot still has enough
  programs to stream x and A at full bandwidth; under torch.use_deterministic_algorithms(True) it does
  not split (one plain store per element: bitwise reproducible). The expand reads y once and writes it
  once per element.
* the fused GEMM tiles the output over *all* tokens in sorted order (full tiles for the base GEMM,
  gathering x rows and scattering y rows through sorted_token_ids) and, in the epilogue, loops over the
  distinct slots present in the tile (one for nearly every prefill tile), adding s_l · S B_lᵀ for the rows
  of each; tiles of `-1` tokens skip the loop.

Heterogeneous ranks are masks over the padded R (r-blocks at or beyond a slot's rank do nothing).
Several output slices (a fused QKV or gate/up layer, slices of different widths) run in one launch: up
to MAX_SLICES stacks per launch are passed as separate pointers and picked by a runtime slice index (one
copy of the slice code, not one per slice: registers). Every element offset is 64-bit. x, y, S and W0
are read through their strides; the A/B stacks and the [L]/[T] vectors are made contiguous (a no-op for
the buffers MultiLoRALinear and LoRABatch hold). Accumulation is fp32; tl.dot needs every dim >= 16 on a
GPU, so BLOCK_R >= 16 with masks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lora_kernels.dropout import SEED_LOW
from lora_kernels.kernels._common import dot_type, grouped_tile, keep_mask, mma, store_or_add, sum_launch
from lora_kernels.kernels._launch import Launch
from lora_kernels.kernels.tiling import num_tiles, tile_block_m

__all__ = ["tile_block_m", "num_tiles", "lora_shrink_triton", "lora_expand_triton", "multi_lora_linear_triton",
           "multi_lora_linear_composite", "multi_lora_linear_fwd_triton", "multi_lora_linear_fwd_composite",
           "multi_lora_linear_bwd_triton", "plan_shrink", "plan_expand", "plan_linear", "plan_fused",
           "plan_composite", "plan_bwd", "slot_dropout"]

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


@triton.jit
def _tile_tokens(sorted_ids_ptr, tile_start_ptr, tile_end_ptr, t, BLOCK_M: tl.constexpr):
    """(token ids as int64, their mask) of segment tile t: its positions in sorted order, BLOCK_M at most."""
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    pos = start + tl.arange(0, BLOCK_M)
    mask_m = pos < end
    return tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64), mask_m


@triton.jit
def _pick(i, v0, v1, v2, v3, NUM_SLICES: tl.constexpr):
    """v_i for a runtime slice index i (pointers or widths of the slices of one launch)."""
    v = v0
    if NUM_SLICES > 1:
        if i == 1:
            v = v1
        if i == 2:
            v = v2
        if i == 3:
            v = v3
    return v


# --------------------------------------------------------------------------------------------------
# shrink
# --------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed"])
def _multi_lora_shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, s_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr, thr_ptr, keep_ptr,
    K, R, num_slices, slice_base, split_k, seed,
    stride_xm, stride_xk, stride_sm, stride_sr,
    HAS_RANKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr, ATOMIC: tl.constexpr,
    CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """S[toks, (slice_base + s)·R + r0 + j] (+)= x̂[toks] · A_s[slot, r0 + j] for r0 + j < rank.

    Grid (NT tiles, num_slices · r-blocks · split_k). A stacks contiguous [L, R, K]; S [T, *] float32,
    zeroed. ATOMIC: split_k programs add their K-ranges into S; else split_k == 1 and one store per element.
    HAS_DROPOUT: x̂ = x ⊙ m / (1 - p_slot), the mask regenerated for the elements loaded (threshold
    thr[slot], scale keep[slot]); else x̂ = x.
    """
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
        toks, mask_m = _tile_tokens(sorted_ids_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        a_ptr = _pick(s, a0_ptr, a1_ptr, a2_ptr, a3_ptr, NUM_SLICES)
        a_base = a_ptr + slot.to(tl.int64) * R * K
        if HAS_DROPOUT:
            thr = tl.load(thr_ptr + slot)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(ks * BLOCK_K, K, BLOCK_K * split_k):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            x = tl.load(x_ptr + toks[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep_mask(seed, thr, toks, k0, K, BLOCK_M, BLOCK_K), x, 0.0)
            a = tl.load(a_base + offs_r[None, :].to(tl.int64) * K + offs_k[:, None],
                        mask=mask_r[None, :] & mask_k[:, None], other=0.0)
            acc = mma(x, a, acc, CT, PRECISION)
        if HAS_DROPOUT:
            acc = acc * tl.load(keep_ptr + slot)
        s_ptrs = s_ptr + toks[:, None] * stride_sm + ((slice_base + s) * R + offs_r)[None, :].to(tl.int64) * stride_sr
        mask = mask_m[:, None] & mask_r[None, :]
        if ATOMIC:
            # Nothing reads S back in this kernel, so no ordering is needed: relaxed (RED, no fences).
            tl.atomic_add(s_ptrs, acc, mask=mask, sem="relaxed")
        else:
            tl.store(s_ptrs, acc, mask=mask)


# --------------------------------------------------------------------------------------------------
# expand (shared by the expand kernel and the fused GEMM's epilogue)
# --------------------------------------------------------------------------------------------------

@triton.jit
def _expand_slice(acc, s_ptr, b_ptr, toks, rows, slot, rank, scale, offs_n, n_lo, col0, N_i, R, s_col0,
                  stride_sm, stride_sr, CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr, DX: tl.constexpr):
    """acc[m, :] += scale · S[toks[m], s_col0 + :rank] · B[slot, offs_n - col0, :rank]ᵀ for `rows`, on the
    columns of this tile that fall in the slice [col0, col0 + N_i). B is a contiguous [L, N_i, R] stack;
    DX: an A stack [L, R, N_i] instead (dx += dS A: the same product over A's transposed layout)."""
    # Padding slices (N_i = 0) and slices outside this tile's columns read nothing.
    if (N_i > 0) & (col0 < n_lo + BLOCK_N) & (col0 + N_i > n_lo):
        n_local = offs_n - col0
        mask_n = (n_local >= 0) & (n_local < N_i)
        b_base = b_ptr + slot.to(tl.int64) * N_i * R
        # Not software-pipelined: 16-wide rank chunks, usually one, and every register counts here.
        for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            s = tl.load(s_ptr + toks[:, None] * stride_sm + (s_col0 + offs_r)[None, :].to(tl.int64) * stride_sr,
                        mask=rows[:, None] & mask_r[None, :], other=0.0)
            if DX:
                b = tl.load(b_base + offs_r[:, None].to(tl.int64) * N_i + n_local[None, :],
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            else:
                b = tl.load(b_base + n_local[None, :] * R + offs_r[:, None],
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = mma(s * scale, b, acc, CT, PRECISION)
    return acc


@triton.jit
def _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, rows, slot, rank, scale,
                   offs_n, n_lo, R, slice_base, stride_sm, stride_sr,
                   NUM_SLICES: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DX: tl.constexpr):
    """All slices of one launch; slice i's columns start at Σ_{k<i} N_k (tile columns offs_n). DX: the
    stacks are A stacks [L, R, N_i] and every slice adds into the same columns [0, N_i) (dx = Σ_i dS_i A_i).

    A loop over a runtime slice index, not NUM_SLICES unrolled copies: the fused GEMM's epilogue with 3
    slices took 186 registers unrolled (sm_90, 128x128 tiles, 8 warps), one CTA per SM."""
    col0 = 0
    for i in range(NUM_SLICES):
        n_i = _pick(i, N0, N1, N2, N3, NUM_SLICES)
        acc = _expand_slice(acc, s_ptr, _pick(i, b0_ptr, b1_ptr, b2_ptr, b3_ptr, NUM_SLICES), toks, rows, slot,
                            rank, scale, offs_n, n_lo, col0, n_i, R, (slice_base + i) * R, stride_sm, stride_sr,
                            CT, PRECISION, BLOCK_N, BLOCK_R, DX)
        if not DX:
            col0 += n_i
    return acc


@triton.jit
def _scaled_rows(y_ptr, cs_ptr, bias_ptr, toks, mask_m, acc, row, offs_n, y_col0, N, stride_ym, stride_yn, stride_cs,
                 HAS_BIAS: tl.constexpr):
    """y[toks, y_col0 + offs_n] = col_scale[row, y_col0 + offs_n] ⊙ (y + acc) + b[y_col0 + offs_n]: one read and
    one write of y, in float32, rounded once (y holds x W0ᵀ without the bias)."""
    mask_n = offs_n < N
    cols = y_col0 + offs_n
    g = tl.load(cs_ptr + row.to(tl.int64) * stride_cs + cols, mask=mask_n, other=1.0).to(tl.float32)
    y_ptrs = y_ptr + toks[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    out = (tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc) * g[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _multi_lora_expand_kernel(
    s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, y_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr, scalings_ptr, thr_ptr,
    cs_ptr, bias_ptr, seg_starts_ptr, seg_lens_ptr,
    N0, N1, N2, N3, R, slice_base, y_col0, seed, T, L, NT,
    stride_sm, stride_sr, stride_ym, stride_yn, stride_cs,
    HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, DX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (NT tiles, cdiv(width, BLOCK_N)). y[toks, y_col0 + n] += the tile's LoRA term, read and written once.

    Forward: width Σ N_i, term s_l · Σ_i S_i B_i[l]ᵀ (scalings_ptr = the scalings). DX (the backward's dx, with
    S = dS and A stacks [L, R, N0] for B): width N0 = in, term (Σ_i dS_i A_i[l]) ⊙ m / (1 - p_l) with the mask
    over (token, column) of y = dx regenerated (HAS_DROPOUT: threshold thr[slot], scalings_ptr = 1 / (1 - p)).

    HAS_COL_SCALE (forward only; y holds x W0ᵀ without the bias): every row is rewritten as
    y[t] = col_scale[l_t] ⊙ (y[t] + term) + b (HAS_BIAS), col_scale [L + 1, *] float32 with row L for the -1
    tokens. Grid (NT + cdiv(T, BLOCK_M), ..): the programs past the NT tiles cover the -1 tokens, which sort last
    (positions [P, T), P = seg_starts[L-1] + seg_lens[L-1]); tiles of rank-0 slots still scale their rows.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    if HAS_COL_SCALE:
        # One path for both kinds of program (two inlined copies of the epilogue spilled 8 B on sm_80, fp32, 4
        # slices): a tile's rows [tile_start, tile_end) of its slot, or a -1 block [P + j·BLOCK_M, T) with row L
        # of col_scale and rank 0 (no LoRA term); an unused tile gets an empty range.
        slot = tl.load(tile_slot_ptr + pid_t, mask=pid_t < NT, other=-1)
        is_tile = slot >= 0
        none_start = tl.load(seg_starts_ptr + L - 1) + tl.load(seg_lens_ptr + L - 1) + (pid_t - NT) * BLOCK_M
        start = tl.where(is_tile, tl.load(tile_start_ptr + pid_t, mask=is_tile, other=0), none_start)
        end = tl.where(is_tile, tl.load(tile_end_ptr + pid_t, mask=is_tile, other=0),
                       tl.where(pid_t >= NT, T, none_start))
        if start < end:
            slot_c = tl.maximum(slot, 0)
            rank = tl.where(is_tile, _slot_rank(ranks_ptr, slot_c, R, HAS_RANKS), 0)
            row = tl.where(is_tile, slot, L)
            pos = start + tl.arange(0, BLOCK_M)
            mask_m = pos < end
            toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64)
            n_lo = pid_n.to(tl.int64) * BLOCK_N
            offs_n = n_lo + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, mask_m, slot_c,
                                 rank, tl.load(scalings_ptr + slot_c), offs_n, n_lo, R, slice_base, stride_sm,
                                 stride_sr, NUM_SLICES, CT, PRECISION, BLOCK_N, BLOCK_R, False)
            _scaled_rows(y_ptr, cs_ptr, bias_ptr, toks, mask_m, acc, row, offs_n, y_col0, N0 + N1 + N2 + N3,
                         stride_ym, stride_yn, stride_cs, HAS_BIAS)
    else:
        slot = tl.load(tile_slot_ptr + pid_t)
        slot_c = tl.maximum(slot, 0)
        rank = _slot_rank(ranks_ptr, slot_c, R, HAS_RANKS)
        if (slot >= 0) & (rank > 0):
            if DX and not HAS_DROPOUT:
                scale = 1.0
            else:
                scale = tl.load(scalings_ptr + slot_c)
            toks, mask_m = _tile_tokens(sorted_ids_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
            n_lo = pid_n.to(tl.int64) * BLOCK_N
            offs_n = n_lo + tl.arange(0, BLOCK_N)
            if DX:
                N = N0
            else:
                N = N0 + N1 + N2 + N3
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, mask_m, slot,
                                 rank, scale, offs_n, n_lo, R, slice_base, stride_sm, stride_sr,
                                 NUM_SLICES, CT, PRECISION, BLOCK_N, BLOCK_R, DX)
            if HAS_DROPOUT:
                acc = tl.where(keep_mask(seed, tl.load(thr_ptr + slot_c), toks, n_lo, N, BLOCK_M, BLOCK_N), acc,
                               0.0)
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
    token_adapter_ptr, sorted_ids_ptr, ranks_ptr, scalings_ptr, cs_ptr,
    T, N, N0, N1, N2, N3, K, R, L,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_ym, stride_yn, stride_cs,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, NUM_SLICES: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, RELOAD_ROWS: tl.constexpr,
):
    """y[T, N] = x W0ᵀ + b + Σ_{slots l in the tile} s_l · S[rows of l] B_lᵀ over tokens in sorted order.

    Grid (cdiv(T, BLOCK_M) · cdiv(N, BLOCK_N),). The epilogue covers slices N0..N3 (columns [0, Σ N_i)).
    HAS_COL_SCALE (Σ N_i = N: every slice in this launch): y[t] = col_scale[l_t] ⊙ (x W0ᵀ + LoRA)[t] + b, each
    slot's row of col_scale [L + 1, N] float32 applied to its rows as the slot loop passes, row L to the -1
    tokens after it, the bias added last.
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
    if HAS_BIAS and not HAS_COL_SCALE:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # RELOAD_ROWS: load the row ids again below (L1 hits) rather than keep them live, in the layouts the
    # epilogue and the store need, across the K loop: 8-16 registers per thread at 128x128 (sm_90: 136 -> 121
    # with one slice). Each load differs from the one before (cache hint, mask) so the compiler does not
    # merge them.
    if RELOAD_ROWS:
        toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0, cache_modifier=".cg").to(tl.int64)
    # Epilogue: the distinct slots of this tile in ascending order (key L = no adapter ends the loop).
    key = tl.load(token_adapter_ptr + toks, mask=mask_m, other=-1)
    key = tl.where((key >= 0) & (key < L), key, L)
    if HAS_COL_SCALE:  # the -1 tokens' row L first (they get no LoRA term): nothing added after the slot loop
        g = tl.load(cs_ptr + tl.full((), L, tl.int64) * stride_cs + offs_n, mask=mask_n, other=1.0)
        acc = tl.where((key == L)[:, None], acc * g[None, :], acc)
    cur = tl.min(key, axis=0)
    while cur < L:
        rank = _slot_rank(ranks_ptr, cur, R, HAS_RANKS)
        scale = tl.load(scalings_ptr + cur)
        acc = _expand_slices(acc, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, N0, N1, N2, N3, toks, key == cur, cur,
                             rank, scale, offs_n, n_lo, R, 0, stride_sm, stride_sr,
                             NUM_SLICES, CT, PRECISION, BLOCK_N, BLOCK_R, False)
        if HAS_COL_SCALE:
            # A [BLOCK_N] row per slot, not a [BLOCK_M, BLOCK_N] gather of rows: no tile-sized temporary.
            g = tl.load(cs_ptr + cur.to(tl.int64) * stride_cs + offs_n, mask=mask_n, other=1.0)
            acc = tl.where((key == cur)[:, None], acc * g[None, :], acc)
        cur = tl.min(tl.where(key > cur, key, L), axis=0)
    if HAS_COL_SCALE and HAS_BIAS:  # the bias after the scale
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELOAD_ROWS:
        toks = tl.load(sorted_ids_ptr + pos, mask=mask_m & (cur >= L), other=0).to(tl.int64)  # cur >= L: always
    tl.store(y_ptr + toks[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# backward: dS and dB in one pass over G, dA over the segments, the tile-ordered sum of dB partials
# (dx = G W0 + the expand kernel in DX mode)
# --------------------------------------------------------------------------------------------------

@triton.jit
def _cols_before(s, N0, N1, N2, NUM_SLICES: tl.constexpr):
    """Σ_{k<s} N_k: where slice s starts among the columns of one launch's slices."""
    c = 0
    if NUM_SLICES > 1:
        c = tl.where(s > 0, N0, 0) + tl.where(s > 1, N1, 0) + tl.where(s > 2, N2, 0)
    return c


@triton.jit
def _multi_lora_bwd_ds_db_kernel(
    g_ptr, s_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, ds_ptr, db0_ptr, db1_ptr, db2_ptr, db3_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr, scalings_ptr,
    N0, N1, N2, N3, R, num_slices, slice_base, g_col0, split_n,
    stride_gm, stride_gn, stride_sm, stride_sr, stride_dsm, stride_dsr,
    NUM_SLICES: tl.constexpr, COMPUTE_DB: tl.constexpr, ATOMIC: tl.constexpr, CT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over a segment tile's rows of G (slot l, scale s_l, slice s, G columns c_s = g_col0 + Σ_{k<s} N_k),
    for r < r_l:

                    dS[toks, (slice_base + s)·R + r] (+)= s_l · G[toks, c_s:c_s + N_s] B_s[l, :, r]
        COMPUTE_DB  dB_s[l] += s_l · G[toks, c_s:c_s + N_s]ᵀ S[toks, (slice_base + s)·R + r]

    Grid (NT tiles, num_slices · r-blocks · split_n). Program (tile, s, rb, j) walks the n-blocks j, j + split_n,
    .. of slice s, from a different one per tile so that the tiles of one slot add into different rows of dB
    at a time; its dS block sums over those n-blocks. ATOMIC: both add into zeroed float32 buffers (dB_s
    [L, N_s, R]). Else (deterministic) split_n == 1, dS is stored and the tile's dB partial is stored at
    dB_s[tile] (a [NT, N_s, R] workspace that _multi_lora_tile_sum_kernel sums in tile order).
    B stacks contiguous [L, N_s, R]; ranks: [L] int32.
    """
    pid_t = tl.program_id(0)
    pid_z = tl.program_id(1)
    num_rb = tl.cdiv(R, BLOCK_R)
    j = pid_z % split_n
    rb = (pid_z // split_n) % num_rb
    s = pid_z // (split_n * num_rb)
    slot = tl.load(tile_slot_ptr + pid_t)
    rank = _slot_rank(ranks_ptr, tl.maximum(slot, 0), R, True)
    r0 = rb * BLOCK_R
    if (slot >= 0) & (r0 < rank) & (s < num_slices):
        scale = tl.load(scalings_ptr + slot)
        toks, mask_m = _tile_tokens(sorted_ids_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        mask_mr = mask_m[:, None] & mask_r[None, :]
        s_cols = ((slice_base + s) * R + offs_r).to(tl.int64)
        n_s = _pick(s, N0, N1, N2, N3, NUM_SLICES)
        g_cols = g_col0 + _cols_before(s, N0, N1, N2, NUM_SLICES)
        if COMPUTE_DB:
            sv = tl.load(s_ptr + toks[:, None] * stride_sm + s_cols[None, :] * stride_sr, mask=mask_mr, other=0.0)
            db_row = slot if ATOMIC else pid_t
            db_base = _pick(s, db0_ptr, db1_ptr, db2_ptr, db3_ptr, NUM_SLICES) + db_row.to(tl.int64) * n_s * R
        b_base = _pick(s, b0_ptr, b1_ptr, b2_ptr, b3_ptr, NUM_SLICES) + slot.to(tl.int64) * n_s * R
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        count = tl.cdiv(tl.cdiv(n_s, BLOCK_N) - j, split_n)  # this program's n-blocks (<= 0: none)
        for i in range(0, count):
            nb = j + ((i + pid_t) % count) * split_n
            offs_n = nb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_s
            g = tl.load(g_ptr + toks[:, None] * stride_gm + (g_cols + offs_n)[None, :] * stride_gn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            mask_nr = mask_n[:, None] & mask_r[None, :]
            b = tl.load(b_base + offs_n[:, None] * R + offs_r[None, :], mask=mask_nr, other=0.0)
            ds = mma(g, b, ds, CT, PRECISION)
            if COMPUTE_DB:
                db = mma(tl.trans(g), sv, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), CT, PRECISION)
                store_or_add(db_base + offs_n[:, None] * R + offs_r[None, :], db * scale, mask_nr, ATOMIC)
        store_or_add(ds_ptr + toks[:, None] * stride_dsm + s_cols[None, :] * stride_dsr, ds * scale, mask_mr, ATOMIC)


@triton.jit
def _da_flush(acc, da_ptr, slot, offs_r, offs_k, mask_k, K, R, ranks_ptr, keep_ptr,
              HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr):
    """dA[slot, offs_r, offs_k] (+)= acc [· 1 / (1 - p_slot)] for rows below the slot's rank; slot < 0: nothing."""
    if slot >= 0:
        if HAS_DROPOUT:
            acc = acc * tl.load(keep_ptr + slot)
        mask = (offs_r < _slot_rank(ranks_ptr, slot, R, True))[:, None] & mask_k[None, :]
        store_or_add(da_ptr + slot.to(tl.int64) * R * K + offs_r[:, None].to(tl.int64) * K + offs_k[None, :], acc,
                     mask, ATOMIC)


@triton.jit(do_not_specialize=["seed"])
def _multi_lora_bwd_da_kernel(
    ds_ptr, x_ptr, da0_ptr, da1_ptr, da2_ptr, da3_ptr,
    sorted_ids_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, ranks_ptr, thr_ptr, keep_ptr,
    NT, tiles_per_prog, K, R, num_slices, slice_base, seed,
    stride_dsm, stride_dsr, stride_xm, stride_xk,
    HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr, ATOMIC: tl.constexpr,
    CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dA_s[l, r, k] = Σ_{tokens t of slot l} dS[t, (slice_base + s)·R + r] x̂[t, k] for r < rank, with
    x̂ = x ⊙ m / (1 - p_l) (HAS_DROPOUT: the mask regenerated, threshold thr[l], scale keep[l]).

    Grid (cdiv(NT, tiles_per_prog), k-blocks, num_slices · r-blocks). Program (c, kb, s·rb) walks the segment
    tiles [c·tiles_per_prog, ..) in BLOCK_M-row steps, keeping its [BLOCK_R, BLOCK_K] block of dA in registers
    while the slot stays the same (the tiles of a slot are consecutive), and flushes it when the slot changes
    or the walk ends: added into a zeroed float32 dA (ATOMIC), or stored (one program walks every tile, so
    each slot is flushed once: deterministic). dA buffers contiguous [L, R, K], rows past the rank untouched;
    ranks: [L] int32.
    """
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)
    num_rb = tl.cdiv(R, BLOCK_R)
    rb = pid_z % num_rb
    s = pid_z // num_rb
    if s < num_slices:
        da_ptr = _pick(s, da0_ptr, da1_ptr, da2_ptr, da3_ptr, NUM_SLICES)
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        r0 = rb * BLOCK_R
        offs_r = r0 + tl.arange(0, BLOCK_R)
        s_cols = ((slice_base + s) * R + offs_r).to(tl.int64)
        t_lo = pid_c * tiles_per_prog
        cur = tl.load(tile_slot_ptr + t_lo)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for i in range(t_lo, tl.minimum(NT, t_lo + tiles_per_prog)):
            slot = tl.load(tile_slot_ptr + i)
            if slot != cur:
                _da_flush(acc, da_ptr, cur, offs_r, offs_k, mask_k, K, R, ranks_ptr, keep_ptr, HAS_DROPOUT, ATOMIC)
                acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
                cur = slot
            rank = _slot_rank(ranks_ptr, tl.maximum(slot, 0), R, True)
            if (slot >= 0) & (r0 < rank):
                mask_r = offs_r < rank
                if HAS_DROPOUT:
                    thr = tl.load(thr_ptr + slot)
                end = tl.load(tile_end_ptr + i)
                for p0 in range(tl.load(tile_start_ptr + i), end, BLOCK_M):
                    pos = p0 + tl.arange(0, BLOCK_M)
                    mask_m = pos < end
                    toks = tl.load(sorted_ids_ptr + pos, mask=mask_m, other=0).to(tl.int64)
                    ds_t = tl.load(ds_ptr + s_cols[:, None] * stride_dsr + toks[None, :] * stride_dsm,
                                   mask=mask_r[:, None] & mask_m[None, :], other=0.0)
                    x = tl.load(x_ptr + toks[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    if HAS_DROPOUT:
                        x = tl.where(keep_mask(seed, thr, toks, k0, K, BLOCK_M, BLOCK_K), x, 0.0)
                    acc = mma(ds_t, x, acc, CT, PRECISION)
        _da_flush(acc, da_ptr, cur, offs_r, offs_k, mask_k, K, R, ranks_ptr, keep_ptr, HAS_DROPOUT, ATOMIC)


@triton.jit
def _multi_lora_tile_sum_kernel(ws_ptr, out_ptr, first_tile_ptr, seg_lens_ptr, ranks_ptr, numel, R, tile_m,
                                BLOCK: tl.constexpr):
    """out[l] = Σ_{tiles i of slot l} ws[i] in tile order (the same bits on every run), masked to the
    columns r < rank of rows of R; 0 for a slot without tiles. ws float32 [NT, numel], out [L, numel] (any
    float type), both contiguous; slot l's tiles are first_tile[l] .. + cdiv(seg_lens[l], tile_m).
    Grid (L, cdiv(numel, BLOCK))."""
    slot = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    keep = mask & ((offs % R) < _slot_rank(ranks_ptr, slot, R, True))
    first = tl.load(first_tile_ptr + slot).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, tl.cdiv(tl.load(seg_lens_ptr + slot), tile_m)):
        acc += tl.load(ws_ptr + (first + i) * numel + offs, mask=keep, other=0.0)
    tl.store(out_ptr + slot.to(tl.int64) * numel + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Configs. No GPU was available to tune these; they are sized so that every one compiles for sm_80 and
# sm_90 without register spills (kernels/aot_cases.py lists them for aot_check; tests/test_aot.py checks both),
# and so that the grids fill the GPU (tests/test_kernels_multi_lora.py checks the grid sizes).
# --------------------------------------------------------------------------------------------------

_NUM_SMS = 132          # an H100 SXM; an A100's 108 SMs are filled by whatever fills 132
_TARGET_PROGRAMS = 528  # ~4 programs per SM: enough bytes in flight for the GEMV-like shrink
# Bound on a split shrink's grid, about two waves of resident 4-warp CTAs on an H100 (14-16 per SM): the
# programs of unused tiles exit at once.
_MAX_PROGRAMS = 8 * _TARGET_PROGRAMS


class GemmTile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # RELOAD_ROWS (see the kernel). Not a register question at small tiles, but ptxas spilled 8-16 B of a
    # value live across the K loop at 16x16 fp32 with it, and at 16-bit 16xN / fp32 32x64 without it.
    reload_rows: bool


# Fused GEMM tiles by x's element size, largest first: the launcher takes the first whose grid fills one
# wave of _NUM_SMS CTAs, else the last. 128x128 alone gave 32 CTAs on 132 SMs at T=128 (out=4096). 128x128
# at 8 warps takes <= 128 registers on sm_90 (2 CTAs per SM) thanks to the epilogue's slice loop and
# reloaded row ids. fp32 ("ieee" dots run on FMAs with operands in registers) keeps to 4 warps and small
# tiles: 64x128 at 8 warps took 172-228 registers (one CTA per SM), 64x64 up to 255 on sm_80, and ptxas
# spilled 8-16 B at 16x64 / 16x32 with 4 slices.
_GEMM_TILES = {
    2: [GemmTile(128, 128, 64, 8, 8, 3, True), GemmTile(64, 128, 64, 8, 4, 3, True),
        GemmTile(64, 64, 64, 8, 4, 3, True), GemmTile(32, 64, 128, 8, 4, 3, True),
        GemmTile(16, 64, 128, 8, 4, 4, True), GemmTile(16, 16, 256, 8, 4, 3, True)],
    4: [GemmTile(32, 64, 32, 8, 4, 2, True), GemmTile(16, 16, 64, 8, 4, 2, False)],
}


def _gemm_config(T: int, N: int, elem_size: int) -> GemmTile:
    tiles = _GEMM_TILES[elem_size]
    for tile in tiles:
        if triton.cdiv(T, tile.block_m) * triton.cdiv(N, tile.block_n) >= _NUM_SMS:
            return tile
    return tiles[-1]


def _shrink_block_r(R: int) -> int:
    # One r-block covers R <= 64 (x read once per tile); tl.dot needs >= 16 on a GPU.
    return 16 if R <= 16 else 64


_EXPAND_BLOCK_R = 16  # the expand loops over 16-wide rank chunks, so one config serves every rank


# Expand BLOCK_N by y's element size: (wide, narrow). fp32 keeps to 32 (64 spilled 24 B on sm_90, 4 slices).
_EXPAND_BLOCK_N = {2: (128, 64), 4: (32, 16)}


def _expand_block_n(T: int, N: int, elem_size: int, dx: bool = False, col_scale: bool = False) -> int:
    # The narrow one when a batch on one slot (the fewest tiles: cdiv(T, BLOCK_M)) would give fewer than 2
    # programs per SM with the wide one: T=64..512 on 4096 columns. dx's expand (DX, 4 slices) at 16-row
    # tiles spilled 16 B on sm_90 with the wide one: narrow there. The fp32 col_scale epilogue (4 slices,
    # 64-row tiles) spilled 16 B on sm_90 at 32 (80 registers): narrow for fp32 with col_scale.
    wide, narrow = _EXPAND_BLOCK_N[elem_size]
    if (dx and tile_block_m(T) == 16) or (col_scale and elem_size == 4):
        return narrow
    return wide if triton.cdiv(T, tile_block_m(T)) * triton.cdiv(N, wide) >= 2 * _NUM_SMS else narrow


def _shrink_block_k(elem_size: int, block_r: int) -> int:
    # 16-bit: 256 B of each x row per iteration, half that beside a 64-wide A tile (246 registers on
    # sm_80 otherwise). fp32: 32 (its FMA dots spilled at 64).
    if elem_size == 4:
        return 32
    return 128 if block_r == 16 else 64


def _shrink_warps(elem_size: int, block_r: int) -> int:
    return 8 if (elem_size == 4 and block_r == 64) else 4


def _shrink_stages(elem_size: int, block_r: int) -> int:
    # fp32 with BLOCK_R=16 and a plain store spilled 8 B on sm_90 at 3 stages.
    return 2 if (elem_size == 4 and block_r == 16) else 3


def _compute_type(dtype: torch.dtype):
    """(tl compute type, fp32 dot precision)."""
    ct = dot_type(dtype)
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return ct, precision


def shrink_split_k(T: int, num_slots: int, K: int, R: int, num_slices: int, elem_size: int) -> int:
    """How many programs split the shrink's K reduction (a power of two).

    Which tiles do work is not known on the host (that would be a sync): at fewest cdiv(T, BLOCK_M), every
    token on one slot; at most num_tiles(T, L). Split until the fewest give _TARGET_PROGRAMS programs, while
    the grid (sized for the most) stays within _MAX_PROGRAMS, and every split keeps >= 1 BLOCK_K step.
    """
    block_r = _shrink_block_r(R)
    return _split(T, num_slots, num_slices * triton.cdiv(R, block_r),
                  triton.cdiv(K, _shrink_block_k(elem_size, block_r)))


def _split(T: int, num_slots: int, per_tile: int, max_split: int) -> int:
    """The power of two that splits each segment tile's work (per_tile programs) across programs: until a batch
    on one slot (the fewest tiles, cdiv(T, BLOCK_M)) gives _TARGET_PROGRAMS programs, while the grid (sized for
    num_tiles(T, L)) stays within _MAX_PROGRAMS, and at most max_split."""
    fewest = max(1, triton.cdiv(T, tile_block_m(T))) * per_tile
    most = max(1, num_tiles(T, num_slots)) * per_tile
    split = 1
    while split * 2 <= max_split and split * 2 * fewest <= _TARGET_PROGRAMS and split * 2 * most <= _MAX_PROGRAMS:
        split *= 2
    return split


class DsDbTile(NamedTuple):
    block_n: int
    num_warps: int
    num_stages: int


def _ds_db_config(elem_size: int, block_r: int) -> DsDbTile:
    """The dS/dB kernel's n-block walk: per step a [BLOCK_M, BLOCK_N] tile of G (BLOCK_M: the segment tile
    height, 16 or 64), a [BLOCK_N, BLOCK_R] tile of B, and the [BLOCK_N, BLOCK_R] dB partial sent to memory
    (R/BLOCK_M of G's elements), beside the [BLOCK_M, BLOCK_R] dS and S blocks held across the walk.
    16-bit at BLOCK_R=64: BLOCK_N=64 spilled 8-64 B on sm_80 at 64-row tiles (242 registers); 32 takes 202."""
    if elem_size == 2:
        return DsDbTile(128, 4, 2) if block_r == 16 else DsDbTile(32, 8, 2)
    # fp32 (FMA dots, operands in registers): 2 stages spilled 8 B at (32, 4 warps) on sm_90 and (16, 8 warps) on
    # sm_80; 1 stage, or 16 warps at BLOCK_R=64 (64 registers), do not.
    return DsDbTile(32, 4, 1) if block_r == 16 else DsDbTile(16, 16, 2)


def ds_db_split_n(T: int, num_slots: int, num_slices: int, max_width: int, R: int, elem_size: int) -> int:
    """Programs that split each tile's walk over the output columns (a power of two; dS partials then add
    atomically): a decode batch has a tile or a few, and `out` is thousands of columns."""
    block_r = _shrink_block_r(R)
    block_n = _ds_db_config(elem_size, block_r).block_n
    return _split(T, num_slots, num_slices * triton.cdiv(R, block_r), triton.cdiv(max_width, block_n))


def _da_config(T: int, elem_size: int, block_r: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the dA kernel: [BLOCK_M, BLOCK_K] x̂ steps (with their dropout mask)
    beside the [BLOCK_R, BLOCK_M] dS block and the [BLOCK_R, BLOCK_K] dA block held across the walk."""
    block_m = min(tile_block_m(T), 32)
    if elem_size == 2:
        # At 4 warps the dropout variant sat at 128 registers and spilled 8 B on sm_90 under triton 3.9; at 8
        # warps it needs <= 118 (sm_80) / 98 (sm_90).
        return (block_m, 128, 8) if block_r == 16 else (block_m, 64, 4)
    return block_m, 32, (4 if block_r == 16 else 8)


def da_tiles_per_program(T: int, K: int, R: int, num_slices: int, elem_size: int) -> int:
    """Segment tiles each dA program walks (a power of two): as many as still give a batch on one slot (the
    fewest tiles) _TARGET_PROGRAMS programs; each walk flushes its dA block once per slot it meets (an atomic
    add of [BLOCK_R, BLOCK_K]), so longer walks add less."""
    block_r = _shrink_block_r(R)
    per_walk = triton.cdiv(K, _da_config(T, elem_size, block_r)[1]) * num_slices * triton.cdiv(R, block_r)
    fewest = max(1, triton.cdiv(T, tile_block_m(T)))
    tiles = 1
    while tiles * 2 <= fewest and triton.cdiv(fewest, tiles * 2) * per_walk >= _TARGET_PROGRAMS:
        tiles *= 2
    return tiles


_TILE_SUM_BLOCK = 1024  # elements per program of _multi_lora_tile_sum_kernel


class SlotDropout(NamedTuple):
    """One call's per-slot dropout as the kernels take it (see lora_kernels/dropout.py)."""
    seed: int
    thr: torch.Tensor   # [L] int32: keep_threshold(p_l), 0 (keep all) for p_l = 0
    keep: torch.Tensor  # [L] float32: 1 / (1 - p_l)


def slot_dropout(dropout, seed):
    """SlotDropout for the ops' (dropout, seed), or None when seed is None. dropout: [L] float64 probabilities,
    or the step's rates object (`lora_kernels.ops.batch.StepDropout`: its threshold / keep_scale vectors, made
    once per step); seed: a [1] int64 CPU tensor or a host int. From a tensor the vectors come from device ops,
    never read on the host; thr equals lora_kernels.dropout.keep_threshold bit for bit (both round half to even)."""
    if seed is None:
        return None
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    if hasattr(dropout, "threshold"):
        return SlotDropout(seed, dropout.threshold, dropout.keep_scale)
    p = dropout.to(torch.float64)
    thr = torch.round(p * 2.0 ** 31).clamp_(max=2 ** 31 - 1).to(torch.int32)
    return SlotDropout(seed, thr, (1.0 / (1.0 - p)).to(torch.float32))


def _pad_slices(stacks: list) -> list:
    return stacks + [stacks[0]] * (MAX_SLICES - len(stacks))


def _chunks(stacks: list):
    for i in range(0, len(stacks), MAX_SLICES):
        yield i, stacks[i:i + MAX_SLICES]


# --------------------------------------------------------------------------------------------------
# Plans: the launches for given tensors (meta tensors work: the AOT tests compile exactly these).
# bt is the 7-tuple of LoRABatch tensors (LoRABatch.op_args order). `deterministic` plans add nothing
# atomically: every output element is written by one store (bitwise reproducible run to run).
# --------------------------------------------------------------------------------------------------

def plan_shrink(x, A_stacks, S, bt, ranks, deterministic: bool = False,
                drop: SlotDropout | None = None) -> list[Launch]:
    """S (zeroed [T, NS·R] float32) gets x̂ · A_lᵀ per token (x̂ = x, or x ⊙ m / (1 - p_l) with `drop`): one
    launch per MAX_SLICES slices."""
    T, K = x.shape
    L, R, _ = A_stacks[0].shape
    ct, precision = _compute_type(x.dtype)
    block_r = _shrink_block_r(R)
    block_m = tile_block_m(T)
    _, sid, _, _, tsl, tst, ten = bt
    split_k = 1 if deterministic else shrink_split_k(T, L, K, R, min(len(A_stacks), MAX_SLICES), x.element_size())
    if drop is not None and ranks is None:  # training: one compiled variant (ranks read), not two
        ranks = torch.full((L,), R, dtype=torch.int32, device=x.device)
    launches = []
    for base, chunk in _chunks(A_stacks):
        a = _pad_slices(chunk)
        ns = len(chunk)
        launches.append(Launch(
            _multi_lora_shrink_kernel, (tsl.shape[0], ns * triton.cdiv(R, block_r) * split_k),
            dict(x_ptr=x, a0_ptr=a[0], a1_ptr=a[1], a2_ptr=a[2], a3_ptr=a[3], s_ptr=S,
                 sorted_ids_ptr=sid, tile_slot_ptr=tsl, tile_start_ptr=tst, tile_end_ptr=ten,
                 ranks_ptr=ranks if ranks is not None else tsl, thr_ptr=drop.thr if drop else tsl,
                 keep_ptr=drop.keep if drop else S,
                 K=K, R=R, num_slices=ns, slice_base=base, split_k=split_k, seed=drop.seed if drop else SEED_LOW,
                 stride_xm=x.stride(0), stride_xk=x.stride(1), stride_sm=S.stride(0), stride_sr=S.stride(1)),
            dict(HAS_RANKS=ranks is not None, HAS_DROPOUT=drop is not None, NUM_SLICES=1 if ns == 1 else MAX_SLICES,
                 ATOMIC=split_k > 1,
                 CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=_shrink_block_k(x.element_size(), block_r),
                 BLOCK_R=block_r),
            num_warps=_shrink_warps(x.element_size(), block_r), num_stages=_shrink_stages(x.element_size(), block_r)))
    return launches


def _expand_launch(S, chunk, base, y, y_col0, bt, scalings, ranks, block_n=None, dx: bool = False,
                   drop: SlotDropout | None = None, col_scale=None, bias=None) -> Launch:
    """y[:, y_col0:] += the expand of the (<= MAX_SLICES) B stacks `chunk`, S columns from slice `base` on.
    dx: `chunk` holds A stacks [L, R, in], y is dx (y_col0 = 0), S is dS; `drop` applies the mask to the term.
    col_scale ([L + 1, >= y_col0 + width] float32, contiguous; forward only): y[t] = col_scale[l_t] ⊙ (y[t] +
    term) + bias on the chunk's columns for every token (y without the bias; bias [>= y_col0 + width] or None)."""
    T = y.shape[0]
    R = chunk[0].shape[1 if dx else 2]
    ct, precision = _compute_type(y.dtype)
    b = _pad_slices(chunk)
    widths = [c.shape[2 if dx else 1] for c in chunk] + [0] * (MAX_SLICES - len(chunk))
    width = widths[0] if dx else sum(widths)
    block_n = block_n or _expand_block_n(T, width, y.element_size(), dx, col_scale is not None)
    _, sid, seg_starts, seg_lens, tsl, tst, ten = bt
    NT, bm = tsl.shape[0], tile_block_m(T)
    cs = col_scale is not None
    # With col_scale, cdiv(T, BLOCK_M) programs more: they cover the -1 tokens (which have no tile).
    return Launch(
        _multi_lora_expand_kernel, (NT + (triton.cdiv(T, bm) if cs else 0), triton.cdiv(width, block_n)),
        dict(s_ptr=S, b0_ptr=b[0], b1_ptr=b[1], b2_ptr=b[2], b3_ptr=b[3], y_ptr=y,
             sorted_ids_ptr=sid, tile_slot_ptr=tsl, tile_start_ptr=tst, tile_end_ptr=ten,
             ranks_ptr=ranks if ranks is not None else tsl, scalings_ptr=drop.keep if drop else scalings,
             thr_ptr=drop.thr if drop else tsl, cs_ptr=col_scale if cs else S,
             bias_ptr=bias if bias is not None else S, seg_starts_ptr=seg_starts, seg_lens_ptr=seg_lens,
             N0=widths[0], N1=widths[1], N2=widths[2], N3=widths[3], R=R, slice_base=base, y_col0=y_col0,
             seed=drop.seed if drop else SEED_LOW, T=T, L=seg_lens.shape[0], NT=NT,
             stride_sm=S.stride(0), stride_sr=S.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
             stride_cs=col_scale.stride(0) if cs else 0),
        dict(HAS_RANKS=ranks is not None, NUM_SLICES=1 if len(chunk) == 1 else MAX_SLICES, DX=dx,
             HAS_DROPOUT=drop is not None, HAS_COL_SCALE=cs, HAS_BIAS=cs and bias is not None, CT=ct,
             PRECISION=precision, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_R=_EXPAND_BLOCK_R),
        num_warps=4, num_stages=2)


def plan_expand(S, B_stacks, y, y_offset, bt, scalings, ranks, col_scale=None, bias=None) -> list[Launch]:
    """y[:, y_offset:] += the grouped expand: one launch per MAX_SLICES slices (no atomics). col_scale: each
    launch also rescales its columns of every row (see _expand_launch; y_offset = 0)."""
    launches, col = [], y_offset
    for base, chunk in _chunks(B_stacks):
        launches.append(_expand_launch(S, chunk, base, y, col, bt, scalings, ranks, col_scale=col_scale, bias=bias))
        col += sum(c.shape[1] for c in chunk)
    return launches


def plan_linear(x, weight, bias, S, B_stacks, y, bt, scalings, ranks, col_scale=None) -> list[Launch]:
    """The fused GEMM with the first MAX_SLICES slices in its epilogue (+ expand launches for any others).
    col_scale ([L + 1, N] float32, contiguous) needs every slice in the epilogue (<= MAX_SLICES slices)."""
    if col_scale is not None and len(B_stacks) > MAX_SLICES:
        raise ValueError(f"the fused GEMM applies col_scale to at most {MAX_SLICES} slices, got {len(B_stacks)}")
    T, K = x.shape
    N = weight.shape[0]
    R = B_stacks[0].shape[2]
    L = bt[2].shape[0]
    ct, precision = _compute_type(x.dtype)
    bm, bn, bk, group_m, warps, stages, reload_rows = _gemm_config(T, N, x.element_size())
    if col_scale is not None and (bm, bn) == (16, 64) and bias is None:
        # ptxas on sm_90 at 16x64x128 (16-bit, 4 slices, col_scale; 64 registers, so not pressure) spilled 8 B
        # without a bias at 4 and 3 stages but not at 2, and with a bias at 2 stages but not at 4.
        stages = 2
    first = B_stacks[:MAX_SLICES]
    b = _pad_slices(first)
    widths = [c.shape[1] for c in first] + [0] * (MAX_SLICES - len(first))
    ta, sid = bt[0], bt[1]
    launches = [Launch(
        _multi_lora_gemm_kernel, (triton.cdiv(T, bm) * triton.cdiv(N, bn),),
        dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, s_ptr=S,
             b0_ptr=b[0], b1_ptr=b[1], b2_ptr=b[2], b3_ptr=b[3], y_ptr=y,
             token_adapter_ptr=ta, sorted_ids_ptr=sid, ranks_ptr=ranks if ranks is not None else ta,
             scalings_ptr=scalings, cs_ptr=col_scale if col_scale is not None else scalings,
             T=T, N=N, N0=widths[0], N1=widths[1], N2=widths[2], N3=widths[3], K=K, R=R, L=L,
             stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
             stride_sm=S.stride(0), stride_sr=S.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
             stride_cs=col_scale.stride(0) if col_scale is not None else 0),
        dict(HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None,
             NUM_SLICES=1 if len(first) == 1 else MAX_SLICES, HAS_COL_SCALE=col_scale is not None, CT=ct,
             PRECISION=precision,
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_EXPAND_BLOCK_R, GROUP_M=group_m, RELOAD_ROWS=reload_rows),
        num_warps=warps, num_stages=stages)]
    col = sum(widths)  # the GEMM writes all N columns; slices past MAX_SLICES get expand launches
    for base, chunk in _chunks(B_stacks[MAX_SLICES:]):
        launches.append(_expand_launch(S, chunk, MAX_SLICES + base, y, col, bt, scalings, ranks))
        col += sum(c.shape[1] for c in chunk)
    return launches


def plan_fused(x, weight, bias, A_stacks, B_stacks, S, y, bt, scalings, ranks,
               deterministic: bool = False, drop: SlotDropout | None = None, col_scale=None) -> list[Launch]:
    """Every launch of multi_lora_linear_triton: the shrink of x̂ into S (zeroed), then the fused GEMM into y
    (its epilogue reads S: the base path has no dropout; col_scale applied there too)."""
    return (plan_shrink(x, A_stacks, S, bt, ranks, deterministic, drop)
            + plan_linear(x, weight, bias, S, B_stacks, y, bt, scalings, ranks, col_scale))


def plan_composite(x, A_stacks, B_stacks, S, y, bt, scalings, ranks, deterministic: bool = False,
                   drop: SlotDropout | None = None, col_scale=None, bias=None) -> list[Launch]:
    """The Triton launches of multi_lora_linear_composite once cuBLAS has written y = x W0ᵀ + b: the shrink
    of x̂ into S (zeroed), then the expand into y in place. With col_scale, cuBLAS writes y = x W0ᵀ (no bias)
    and the expand makes it col_scale[l_t] ⊙ (y + LoRA) + bias, one read and one write of y."""
    return (plan_shrink(x, A_stacks, S, bt, ranks, deterministic, drop)
            + plan_expand(S, B_stacks, y, 0, bt, scalings, ranks, col_scale, bias))


def plan_bwd(G, x, A_stacks, B_stacks, S, dx, bt, scalings, ranks, drop: SlotDropout | None = None,
             need_dA: bool = True, need_dB: bool = True, deterministic: bool = False):
    """(launches, [dA_i] or None, [dB_i] or None) of the grouped backward (formulas in ops/multi_lora.py); dx
    (None when not needed) holds G W0, computed by the caller (cuBLAS), and gets the LoRA term added in place.

    G: [T, Σ out_i] in x's dtype; A/B stacks contiguous; S: [T, NS·R] float32. In order: the dS/dB pass over
    G (dS [T, NS·R] float32, internal), the dA walk, dx's expand (DX mode), then the finish: casts of the
    float32 dA/dB sums to the stacks' dtype, or (deterministic) the tile-ordered sum of the dB partials.
    Default: dB and dA add with relaxed float32 atomics into zeroed buffers. Deterministic: no atomics; dB
    as per-tile partials [NT, out_i, R] float32 summed in tile order, dA by one walk over every tile per
    column block (each slot stored once), dS never split.
    """
    T, K = x.shape
    L, R, _ = A_stacks[0].shape
    NT = bt[4].shape[0]
    dev, f32 = x.device, torch.float32
    widths = [b.shape[1] for b in B_stacks]
    ns_max = min(len(A_stacks), MAX_SLICES)
    elem = x.element_size()
    ct, precision = _compute_type(x.dtype)
    block_r = _shrink_block_r(R)
    bm = tile_block_m(T)
    _, sid, _, seg_lens, tsl, tst, ten = bt
    # The backward kernels always read ranks (one compiled variant each, not two): R for every slot if None.
    rk = ranks if ranks is not None else torch.full((L,), R, dtype=torch.int32, device=dev)
    launches, finish, dA, dB = [], [], None, None

    def to_dtype(sums, like):
        # float32 sums are the gradients of float32 stacks; others get a cast launch.
        outs = [w if w.dtype == t.dtype else _alloc(t.shape, t.dtype, dev) for w, t in zip(sums, like)]
        finish.extend(sum_launch(w, o, 1) for w, o in zip(sums, outs) if o is not w)
        return outs

    if dx is not None or need_dA or need_dB:
        # dS always (a B-only backward stores it unread, [T, NS·R] float32: cheaper than a third variant).
        split_n = 1 if deterministic else ds_db_split_n(T, L, ns_max, max(widths), R, elem)
        dS = (_alloc if deterministic else torch.zeros)((T, len(A_stacks) * R), dtype=f32, device=dev)
        if need_dB and deterministic:
            ws = [_alloc((NT, n, R), dtype=f32, device=dev) for n in widths]
            dB = [_alloc(b.shape, dtype=b.dtype, device=dev) for b in B_stacks]
            tiles = (seg_lens.to(torch.int64) + bm - 1) // bm
            first = (torch.cumsum(tiles, 0) - tiles).to(torch.int32)
            finish += [Launch(_multi_lora_tile_sum_kernel, (L, triton.cdiv(n * R, _TILE_SUM_BLOCK)),
                              dict(ws_ptr=w, out_ptr=d, first_tile_ptr=first, seg_lens_ptr=seg_lens, ranks_ptr=rk,
                                   numel=n * R, R=R, tile_m=bm),
                              dict(BLOCK=_TILE_SUM_BLOCK), num_warps=4, num_stages=1)
                       for w, d, n in zip(ws, dB, widths)]
        elif need_dB:
            ws = [torch.zeros(b.shape, dtype=f32, device=dev) for b in B_stacks]
            dB = to_dtype(ws, B_stacks)
        cfg = _ds_db_config(elem, block_r)
        for base, chunk in _chunks(B_stacks):
            ns = len(chunk)
            b = _pad_slices(chunk)
            w = _pad_slices(ws[base:base + ns]) if need_dB else [S] * MAX_SLICES
            wid = widths[base:base + ns] + [0] * (MAX_SLICES - ns)
            launches.append(Launch(
                _multi_lora_bwd_ds_db_kernel, (NT, ns * triton.cdiv(R, block_r) * split_n),
                dict(g_ptr=G, s_ptr=S, b0_ptr=b[0], b1_ptr=b[1], b2_ptr=b[2], b3_ptr=b[3], ds_ptr=dS,
                     db0_ptr=w[0], db1_ptr=w[1], db2_ptr=w[2], db3_ptr=w[3], sorted_ids_ptr=sid, tile_slot_ptr=tsl,
                     tile_start_ptr=tst, tile_end_ptr=ten, ranks_ptr=rk, scalings_ptr=scalings,
                     N0=wid[0], N1=wid[1], N2=wid[2], N3=wid[3], R=R, num_slices=ns, slice_base=base,
                     g_col0=sum(widths[:base]), split_n=split_n, stride_gm=G.stride(0), stride_gn=G.stride(1),
                     stride_sm=S.stride(0), stride_sr=S.stride(1), stride_dsm=dS.stride(0), stride_dsr=dS.stride(1)),
                dict(NUM_SLICES=1 if ns == 1 else MAX_SLICES, COMPUTE_DB=need_dB, ATOMIC=not deterministic, CT=ct,
                     PRECISION=precision, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_R=block_r),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages))

    if need_dA:
        block_m, block_k, warps = _da_config(T, elem, block_r)
        if deterministic:
            tiles_per_prog = max(NT, 1)  # one walk over every tile: each slot's block stored once
            dA = sums = [torch.zeros(a.shape, dtype=a.dtype, device=dev) for a in A_stacks]
        else:
            tiles_per_prog = da_tiles_per_program(T, K, R, ns_max, elem)
            sums = [torch.zeros(a.shape, dtype=f32, device=dev) for a in A_stacks]
            dA = to_dtype(sums, A_stacks)
        for base, chunk in _chunks(sums):
            ns = len(chunk)
            d = _pad_slices(chunk)
            launches.append(Launch(
                _multi_lora_bwd_da_kernel, (triton.cdiv(NT, tiles_per_prog), triton.cdiv(K, block_k),
                                            ns * triton.cdiv(R, block_r)),
                dict(ds_ptr=dS, x_ptr=x, da0_ptr=d[0], da1_ptr=d[1], da2_ptr=d[2], da3_ptr=d[3], sorted_ids_ptr=sid,
                     tile_slot_ptr=tsl, tile_start_ptr=tst, tile_end_ptr=ten, ranks_ptr=rk,
                     thr_ptr=drop.thr if drop else tsl, keep_ptr=drop.keep if drop else dS, NT=NT,
                     tiles_per_prog=tiles_per_prog, K=K, R=R, num_slices=ns, slice_base=base,
                     seed=drop.seed if drop else SEED_LOW, stride_dsm=dS.stride(0), stride_dsr=dS.stride(1),
                     stride_xm=x.stride(0), stride_xk=x.stride(1)),
                dict(HAS_DROPOUT=drop is not None, NUM_SLICES=1 if ns == 1 else MAX_SLICES, ATOMIC=not deterministic,
                     CT=ct, PRECISION=precision,
                     BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r),
                # The deterministic walk (plain stores) spilled 8 B on sm_80 / sm_90 at 16-bit with 2 stages, and
                # at fp32 (BLOCK_R=64, dropout, 4 slices) with 1.
                num_warps=warps, num_stages=1 if (deterministic and elem == 2) else 2))

    if dx is not None:
        launches += [_expand_launch(dS, chunk, base, dx, 0, bt, scalings, rk, dx=True, drop=drop)
                     for base, chunk in _chunks(A_stacks)]
    return launches + finish, dA, dB


# --------------------------------------------------------------------------------------------------
# Launchers called by the registered ops (lora_kernels/ops/multi_lora.py). Inputs are checked there.
# Every launch goes through Launch.run (which launches on the tensors' device); every buffer is
# allocated on x's (or y's) device.
# --------------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _contig(stacks: list) -> list:
    # The kernels index the A/B stacks as contiguous [L, R, in] / [L, out, R] (one stride set for up to 4
    # stacks of different shapes): MultiLoRALinear's slot buffers are, so this is a no-op there.
    return [t.contiguous() for t in stacks]


def _vec(t):
    # bias / scalings / ranks and the LoRABatch tensors are read with unit stride (a no-op for the
    # tensors LoRABatch and MultiLoRALinear hold).
    return None if t is None else t.contiguous()


def _batch(bt) -> tuple:
    return tuple(_vec(t) for t in bt)


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch.run()


def _new_s(x, num_slices: int, R: int):
    # Zeroed: rows of -1 tokens and columns past a slot's rank stay 0; split-K programs add into it.
    return torch.zeros((x.shape[0], num_slices * R), dtype=torch.float32, device=x.device)


def lora_shrink_triton(x, A_stacks, bt, ranks):
    """S [T, NS·R] float32 for 2-D x and a list of [L, R, in] stacks."""
    A_stacks = _contig(A_stacks)
    S = _new_s(x, len(A_stacks), A_stacks[0].shape[1])
    if x.shape[0] > 0:
        _run(plan_shrink(x, A_stacks, S, _batch(bt), _vec(ranks), _deterministic()))
    return S


def lora_expand_triton(S, B_stacks, bt, y, scalings, ranks, y_offset):
    """y[:, y_offset:] += the grouped expand, in place."""
    if y.shape[0] == 0:
        return
    _run(plan_expand(S, _contig(B_stacks), y, y_offset, _batch(bt), _vec(scalings), _vec(ranks)))


def multi_lora_linear_fwd_triton(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout=None, seed=None,
                                 col_scale=None):
    """(y [T, out] = x W0ᵀ + b + grouped LoRA of x̂, S = x̂ Aᵀ [T, NS·R] float32): the shrink (the dropout mask,
    when `seed` is given, regenerated in it), then the GEMM with the expand in its epilogue. dropout: [L]
    float64 per-slot probabilities, seed: [1] int64 (CPU). col_scale [L + 1, out] float32 (inference): y =
    col_scale[l_t] ⊙ (x W0ᵀ + LoRA) + b in the same epilogue; more than MAX_SLICES slices take the composite."""
    if col_scale is not None and len(B_stacks) > MAX_SLICES:
        return multi_lora_linear_fwd_composite(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout,
                                               seed, col_scale)
    T = x.shape[0]
    y = _alloc((T, weight.shape[0]), x.dtype, x.device)
    A_stacks = _contig(A_stacks)
    S = _new_s(x, len(A_stacks), A_stacks[0].shape[1])
    if T > 0:
        _run(plan_fused(x, weight, _vec(bias), A_stacks, _contig(B_stacks), S, y, _batch(bt), _vec(scalings),
                        _vec(ranks), _deterministic(), slot_dropout(dropout, seed), _vec(col_scale)))
    return y, S


def multi_lora_linear_fwd_composite(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout=None,
                                    seed=None, col_scale=None):
    """(y, S) as multi_lora_linear_fwd_triton, but the base GEMM is torch.nn.functional.linear (cuBLAS on a
    GPU), followed by the grouped shrink and the grouped expand into y in place. Needs no tuning: cuBLAS is as
    fast as cuBLAS, and the LoRA kernels are memory-bound. With col_scale the GEMM leaves the bias out and the
    expand adds it after the scale (y = col_scale[l_t] ⊙ (x W0ᵀ + LoRA) + b, no y − b round trip)."""
    cs = col_scale is not None
    y = torch.nn.functional.linear(x, weight, None if cs else bias)
    A_stacks = _contig(A_stacks)
    S = _new_s(x, len(A_stacks), A_stacks[0].shape[1])
    if x.shape[0] > 0:
        _run(plan_composite(x, A_stacks, _contig(B_stacks), S, y, _batch(bt), _vec(scalings), _vec(ranks),
                            _deterministic(), slot_dropout(dropout, seed), _vec(col_scale),
                            _vec(bias) if cs else None))
    return y, S


def multi_lora_linear_triton(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale=None):
    """y [T, out] = [col_scale[l_t] ⊙] (x W0ᵀ + grouped LoRA) + b (inference): multi_lora_linear_fwd_triton
    without dropout."""
    return multi_lora_linear_fwd_triton(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks,
                                        col_scale=col_scale)[0]


def multi_lora_linear_composite(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale=None):
    """y [T, out] = [col_scale[l_t] ⊙] (x W0ᵀ + grouped LoRA) + b (inference): multi_lora_linear_fwd_composite
    without dropout."""
    return multi_lora_linear_fwd_composite(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks,
                                           col_scale=col_scale)[0]


def multi_lora_linear_bwd_triton(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed,
                                 need_dx, need_dA, need_dB):
    """(dx [T, in], [dA_i], [dB_i]), each in its tensor's dtype and None when not needed: dx = G W0 by
    torch.mm (cuBLAS on a GPU) with the grouped LoRA term added in place, dS/dB in one pass over G, dA per
    segment (plan_bwd). The "triton" and "composite" backends share it (their forwards differ only in the
    base GEMM, which the backward does not run)."""
    G = dy.to(x.dtype)
    dx = torch.mm(G, weight) if need_dx else None
    launches, dA, dB = plan_bwd(G, x, _contig(A_stacks), _contig(B_stacks), S, dx, _batch(bt), _vec(scalings),
                                _vec(ranks), slot_dropout(dropout, seed), need_dA, need_dB, _deterministic())
    _run(launches)
    return dx, dA, dB
