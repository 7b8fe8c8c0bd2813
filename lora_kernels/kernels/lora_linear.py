"""Triton kernels for the fused single-adapter LoRA linear (PEFT layout).

    forward   S  = x̂ Aᵀ                              _lora_shrink_kernel       [M, r] float32
              y  = x W0ᵀ + b + s · S Bᵀ               _gemm_lora_kernel         LoRA term in the epilogue
    backward  dS = s · G B,  dB = s · Gᵀ S            _lora_bwd_ds_db_kernel    one pass over G
              dx = G W0 + (dS A) ⊙ m / (1 - p)         _gemm_lora_kernel         LoRA term in the epilogue
              dA = dSᵀ x̂                              _lora_bwd_da_kernel

x̂ = x ⊙ m / (1 - p) is never materialised: every kernel that reads x regenerates the keep-mask m from
the seed (see lora_kernels/dropout.py) for the elements it loads. Accumulation is float32. The LoRA
matmuls run in x's dtype when the adapter weights share it, else in float32 (tf32 when x is 16-bit,
since x's precision bounds the result anyway). Every element offset is computed in 64 bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.dropout import SEED_LOW, keep_threshold
from lora_kernels.kernels._common import dot_type, grouped_tile, mma
from lora_kernels.kernels._launch import Launch

# Tests set this to fill every output buffer with NaN before the kernels run: unwritten elements fail.
POISON_OUTPUTS = False


@triton.jit
def _keep_mask(seed, drop_threshold, offs_m, col_start, n_cols, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dropout keep-mask of the [BLOCK_M, BLOCK_C] tile at rows offs_m, columns col_start.. of an [*, n_cols]
    input (col_start % 4 == 0): one Philox call per 4 columns, see lora_kernels/dropout.py."""
    groups = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    counters = offs_m[:, None] * ((n_cols + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_C))  # column 4g+i <- r_i
    return (bits >> 1).to(tl.int32, bitcast=True) >= drop_threshold


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm,
    seed, drop_threshold, keep_scale, split_k,
    CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[M, R] (float32) = (x ⊙ m) Aᵀ / (1-p). Grid (m-blocks, r-blocks, split_k); split-K adds atomically
    into a zeroed S. Dropout is on iff drop_threshold > 0 (a uniform runtime branch, not a variant)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if drop_threshold > 0:
            x = tl.where(_keep_mask(seed, drop_threshold, offs_m, k0, K, BLOCK_M, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        acc = mma(x, a, acc, CT, PRECISION)
    acc = acc * keep_scale
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :]
    if split_k == 1:
        tl.store(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.atomic_add(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _gemm_lora_kernel(
    p_ptr, q_ptr, bias_ptr, l_ptr, e_ptr, out_ptr, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_er, stride_en,
    stride_om, stride_on,
    has_bias, lora_scale, seed, drop_threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = P Q (+ bias) + lora_scale · (L E) [⊙ m / (1-p)] -- the LoRA term added in the epilogue.

    forward: P = x [M, in], Q = W0ᵀ, L = S [M, r], E = Bᵀ, bias;  backward dx: P = G, Q = W0, L = dS,
    E = A, dropout mask over (row, col) of dx. Bias is a uniform runtime branch; dropout is a compile-time
    variant: without it the LoRA term accumulates into the base accumulator (no second tile, no mask).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(p, q, acc, CT, PRECISION)
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # The LoRA term accumulates straight into acc; only with dropout does it need a tile of its own
    # (the mask applies to it alone), which is why dropout is a compile-time variant.
    if HAS_DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        lora = acc
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        l = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        e = tl.load(e_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_en,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = mma(l * lora_scale, e, lora, CT, PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, drop_threshold, offs_m, pid_n.to(tl.int64) * BLOCK_N, N, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, lora * keep_scale, 0.0)
    else:
        acc = lora
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_ds_db_kernel(
    g_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, M, N, R,
    stride_gm, stride_gn, stride_bn, stride_br, stride_sm, stride_dsm, stride_dbn,
    scaling, compute_db,
    CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over G [M, out]: dS[M, R] = s · G B (stored), dB[out, R] += s · Gᵀ S (float32 atomics).

    Grid (m-blocks, r-blocks). Each program walks all of `out`, starting at a block that depends on its
    row-block so that concurrent programs add into different rows of dB.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_n = tl.cdiv(N, BLOCK_N)
    for i in range(0, num_n):
        nb = (i + pid_m) % num_n
        offs_n = nb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = mma(g, b, ds, CT, PRECISION)
        if compute_db != 0:
            db = mma(tl.trans(g), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), CT, PRECISION)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :], db * scaling,
                          mask=mask_n[:, None] & mask_r[None, :])
    tl.store(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :], ds * scaling,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _lora_bwd_da_kernel(
    ds_ptr, x_ptr, da_ptr, M, K, R,
    stride_dsm, stride_xm, stride_xk, stride_dar,
    seed, drop_threshold, keep_scale, split_m,
    CT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dA[R, in] (float32) = dSᵀ (x ⊙ m) / (1-p). Grid (k-blocks, r-blocks, split_m); split-M adds atomically
    into a zeroed dA."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, BLOCK_M * split_m):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        ds_t = tl.load(ds_ptr + offs_r[:, None] + offs_m[None, :] * stride_dsm,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if drop_threshold > 0:
            keep = _keep_mask(seed, drop_threshold, offs_m, pid_k.to(tl.int64) * BLOCK_K, K, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        acc = mma(ds_t, x, acc, CT, PRECISION)
    acc = acc * keep_scale
    da_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :]
    if split_m == 1:
        tl.store(da_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])
    else:
        tl.atomic_add(da_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------------------------------
# Configs. No GPU was available to tune these: they follow the Triton matmul tutorial's shapes, sized so
# that each compiles for sm_80 and sm_90 without register spills (tests/test_aot.py checks both).
# --------------------------------------------------------------------------------------------------

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by (M class, activation bytes,
# dropout in the epilogue). The dropout mask costs registers (one Philox state per 4 outputs), so tiles
# whose epilogue applies it are smaller.
_GEMM_CONFIGS = {
    # M <= 16 (decode): a GEMV streaming W0 once; narrow N tiles give >= 128 programs for 4096 columns.
    ("small", 2, False): (16, 32, 256, 1, 4, 4),
    ("small", 2, True): (16, 32, 256, 1, 4, 4),
    ("medium", 2, False): (64, 64, 64, 8, 4, 3),
    ("medium", 2, True): (64, 64, 64, 8, 4, 3),
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


def _gemm_config(M: int, elem_size: int, dropout: bool):
    size = "small" if M <= 16 else "medium" if M <= 64 else "large"
    return _GEMM_CONFIGS[(size, elem_size, dropout)]


def _block_r(R: int) -> int:
    # One program covers ranks up to 64 (one pass over its input); tl.dot needs dims >= 16 on a GPU.
    return 16 if R <= 16 else 64


def _shrink_blocks(M: int, elem_size: int, R: int):
    """(BLOCK_M, BLOCK_K) of the shrink kernel: x tiles whose dropout mask and dot fit in registers."""
    if M <= 16:
        return 16, (128 if elem_size == 2 else 64)
    if elem_size == 2:
        return 64, (64 if R <= 16 else 32)
    return (32 if R <= 16 else 16), 32


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


def shrink_split_k(M: int, K: int, R: int, x_elem_size: int) -> int:
    """Split the K reduction when there are too few row-blocks to occupy the GPU (decode sizes)."""
    block_m, block_k = _shrink_blocks(M, x_elem_size, R)
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, _block_r(R))
    return max(1, min(triton.cdiv(K, block_k), _TARGET_PROGRAMS // max(programs, 1)))


def _da_blocks(elem_size: int, R: int):
    """(BLOCK_M, BLOCK_K) of the dA kernel."""
    if elem_size == 2:
        return 64, (64 if R <= 16 else 32)
    return 32, 32


def da_split_m(M: int, K: int, R: int, x_elem_size: int) -> int:
    """Split the M reduction of dA = dSᵀ x̂ so that the few column blocks still fill the GPU."""
    block_m, block_k = _da_blocks(x_elem_size, R)
    programs = triton.cdiv(K, block_k) * triton.cdiv(R, _block_r(R))
    return max(1, min(triton.cdiv(M, block_m), _TARGET_PROGRAMS // max(programs, 1)))


# --------------------------------------------------------------------------------------------------
# Plans: the launches for given tensors (meta tensors work: the AOT tests compile exactly these).
# --------------------------------------------------------------------------------------------------

def _shrink_launch(x, A, S, dropout_p, seed, split_k: int) -> Launch:
    M, K = x.shape
    R = A.shape[0]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    _, ct, precision = _compute_types(x.dtype, A.dtype)
    block_m, block_k = _shrink_blocks(M, x.element_size(), R)
    block_r = _block_r(R)
    return Launch(
        _lora_shrink_kernel, (triton.cdiv(M, block_m), triton.cdiv(R, block_r), split_k),
        dict(x_ptr=x, a_ptr=A, s_ptr=S, M=M, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1),
             stride_ar=A.stride(0), stride_ak=A.stride(1), stride_sm=S.stride(0),
             seed=seed, drop_threshold=thr, keep_scale=keep_scale, split_k=split_k),
        dict(CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r),
        num_warps=4, num_stages=3)


def _gemm_launch(P, Q_kn, bias, L, E_rn, out, lora_scale, dropout_p, seed, lora_dtype) -> Launch:
    """out = P @ Q_kn (+ bias) + lora_scale · L @ E_rn [dropout]; Q_kn / E_rn are (strided) views."""
    M, K = P.shape
    N = out.shape[1]
    R = L.shape[1]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    # The epilogue's LoRA dot runs in the output's own type (y and dx are stored in x's dtype anyway);
    # tf32 operands for fp32 adapters cost registers that spill the 128x128 tile on sm_90.
    ct, _, precision = _compute_types(P.dtype, lora_dtype)
    bm, bn, bk, group_m, warps, stages = _gemm_config(M, P.element_size(), dropout=thr > 0)
    return Launch(
        _gemm_lora_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
        dict(p_ptr=P, q_ptr=Q_kn, bias_ptr=bias if bias is not None else out, l_ptr=L, e_ptr=E_rn, out_ptr=out,
             M=M, N=N, K=K, R=R, stride_pm=P.stride(0), stride_pk=P.stride(1),
             stride_qk=Q_kn.stride(0), stride_qn=Q_kn.stride(1), stride_lm=L.stride(0), stride_lr=L.stride(1),
             stride_er=E_rn.stride(0), stride_en=E_rn.stride(1), stride_om=out.stride(0),
             stride_on=out.stride(1), has_bias=int(bias is not None), lora_scale=float(lora_scale), seed=seed,
             drop_threshold=thr, keep_scale=keep_scale),
        dict(HAS_DROPOUT=thr > 0, CT=ct, PRECISION=precision, BLOCK_M=bm,
             BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_EPILOGUE_BLOCK_R, GROUP_M=group_m),
        num_warps=warps, num_stages=stages)


def plan_fwd(x, weight, bias, A, B, S, y, scaling, dropout_p, seed, split_k: int) -> list[Launch]:
    return [
        _shrink_launch(x, A, S, dropout_p, seed, split_k),
        # y = x W0ᵀ + b + s · S Bᵀ; no dropout on the base path, so the epilogue takes no mask.
        _gemm_launch(x, weight.t(), bias, S, B.t(), y, scaling, 0.0, None, A.dtype),
    ]


def _ds_db_launch(G, B, S, dS, dB_ws, scaling, compute_db: bool) -> Launch:
    M, N = G.shape
    R = B.shape[1]
    _, ct, precision = _compute_types(G.dtype, B.dtype)
    block_r = _block_r(R)
    # dS, the dB partial and S share the registers: smaller tiles for wide ranks and fp32 (FMA) dots.
    block_m = 16 if (block_r == 64 and G.element_size() == 4) else 32
    block_n = 64 if (block_r == 16 and G.element_size() == 2) else 32
    return Launch(
        _lora_bwd_ds_db_kernel, (triton.cdiv(M, block_m), triton.cdiv(R, block_r)),
        dict(g_ptr=G, b_ptr=B, s_ptr=S, ds_ptr=dS, db_ptr=dB_ws, M=M, N=N, R=R,
             stride_gm=G.stride(0), stride_gn=G.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1),
             stride_sm=S.stride(0), stride_dsm=dS.stride(0), stride_dbn=dB_ws.stride(0), scaling=float(scaling),
             compute_db=int(compute_db)),
        dict(CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r),
        num_warps=4, num_stages=3)


def _da_launch(dS, x, dA_ws, lora_dtype, dropout_p, seed, split_m: int) -> Launch:
    M, K = x.shape
    R = dS.shape[1]
    seed, thr, keep_scale = _dropout_args(dropout_p, seed)
    _, ct, precision = _compute_types(x.dtype, lora_dtype)
    block_r = _block_r(R)
    block_m, block_k = _da_blocks(x.element_size(), R)
    return Launch(
        _lora_bwd_da_kernel, (triton.cdiv(K, block_k), triton.cdiv(R, block_r), split_m),
        dict(ds_ptr=dS, x_ptr=x, da_ptr=dA_ws, M=M, K=K, R=R, stride_dsm=dS.stride(0),
             stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dar=dA_ws.stride(0),
             seed=seed, drop_threshold=thr, keep_scale=keep_scale, split_m=split_m),
        dict(CT=ct, PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r),
        num_warps=4, num_stages=3)


def plan_bwd(G, x, weight, A, B, S, dS, dx, dA_ws, dB_ws, scaling, dropout_p, seed, split_m: int,
             need_dx: bool, need_dA: bool, need_dB: bool) -> list[Launch]:
    launches = [_ds_db_launch(G, B, S, dS, dB_ws, scaling, compute_db=need_dB)]
    if need_dx:
        # dx = G W0 + (dS A) ⊙ m/(1-p): the same GEMM kernel, reduction over `out`, epilogue L = dS, E = A.
        launches.append(_gemm_launch(G, weight, None, dS, A, dx, 1.0, dropout_p, seed, A.dtype))
    if need_dA:
        launches.append(_da_launch(dS, x, dA_ws, A.dtype, dropout_p, seed, split_m))
    return launches


# --------------------------------------------------------------------------------------------------
# Launchers called by the registered ops (lora_kernels/ops/lora_linear.py).
# --------------------------------------------------------------------------------------------------

def lora_linear_fwd_triton(x, weight, bias, A, B, scaling, dropout_p, seed):
    """(y [M, out] in x's dtype, S [M, r] float32) for 2-D x."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    split_k = shrink_split_k(M, K, R, x.element_size())
    S = _alloc((M, R), torch.float32, x.device, zero=split_k > 1)
    y = _alloc((M, N), x.dtype, x.device)
    for launch in plan_fwd(x, weight, bias, A, B, S, y, scaling, dropout_p, seed, split_k):
        launch.run()
    return y, S


def lora_linear_bwd_triton(dy, x, weight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    """(dx, dA, dB), each None when not needed, each in its tensor's dtype."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    G = dy.to(x.dtype)
    dS = _alloc((M, R), torch.float32, x.device)
    # dB accumulates atomically over row-blocks; unused, it is a 1-element stand-in the kernel never touches.
    dB_ws = _alloc((N, R) if need_dB else (1, 1), torch.float32, x.device, zero=True)
    dx = _alloc((M, K), x.dtype, x.device) if need_dx else None
    split_m = da_split_m(M, K, R, x.element_size())
    dA_ws = _alloc((R, K), torch.float32, x.device, zero=split_m > 1) if need_dA else None
    for launch in plan_bwd(G, x, weight, A, B, S, dS, dx, dA_ws, dB_ws, scaling, dropout_p, seed, split_m,
                           need_dx, need_dA, need_dB):
        launch.run()
    return (dx, dA_ws.to(A.dtype) if need_dA else None, dB_ws.to(B.dtype) if need_dB else None)


def aot_launches():
    """Every distinct compiled kernel the launchers can pick, built from meta tensors, for the AOT test."""
    meta = dict(device="meta")
    seen = set()
    K, N = 4096, 4096
    for x_dtype in (torch.float16, torch.bfloat16, torch.float32):
        for lora_dtype in sorted({x_dtype, torch.float32}, key=str):
            for M in (1, 64, 4096):          # small / medium / large GEMM and shrink configs
                for R in (16, 64):           # every BLOCK_R
                    x = torch.empty(M, K, dtype=x_dtype, **meta)
                    W = torch.empty(N, K, dtype=x_dtype, **meta)
                    A = torch.empty(R, K, dtype=lora_dtype, **meta)
                    B = torch.empty(N, R, dtype=lora_dtype, **meta)
                    S = torch.empty(M, R, dtype=torch.float32, **meta)
                    y = torch.empty(M, N, dtype=x_dtype, **meta)
                    launches = []
                    for seed in (None, SEED_LOW + 12345):  # without / with dropout
                        launches += plan_fwd(x, W, None, A, B, S, y, 2.0, 0.1, seed, 2)
                        launches += plan_bwd(y, x, W, A, B, S, S, x, A.float(), B.float(), 2.0, 0.1, seed, 2,
                                             True, True, True)
                    for launch in launches:
                        key = (launch.describe(), tuple(sorted(launch.signature().items())))
                        if key not in seen:
                            seen.add(key)
                            yield launch
