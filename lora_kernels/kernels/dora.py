"""Triton kernels for DoRA (weight-decomposed LoRA; the math and PEFT's semantics are in ops/dora.py).

    forward   S = x̂ Aᵀ                                       lora_linear's _lora_shrink_kernel   [M, r] float32
              y, P, n                                         _dora_gemm_kernel
                  main loop over `in` (one read of W0):  acc = x W0ᵀ,  [acc_h = x̂ W0ᵀ: dropout only],
                                                         [V = W0 Aᵀ, w2 = ‖W0_j‖², Σ W0_j: norm only]
                  epilogue:  P = acc_h + s · (S Bᵀ + c),   n² = w2 + 2s · (B_j · V_j + c_j Σ W0_j) + q_j,
                             g = m / n,   y = (acc − acc_h) + b + g ⊙ P
              rows whose n² cancels                           _dora_norm_fixup_kernel (exits at once if none)
    backward  dS = s · (g ⊙ G) B,  dB = s · (g ⊙ G)ᵀ S          lora_linear's _lora_bwd_ds_db_kernel on g ⊙ G
              dx = (g ⊙ G) W0 + dS A                           lora_linear's _gemm_lora_kernel (no dropout)
              dx = G W0 + m/(1-p) ⊙ ((g ⊙ G) W0 − G W0 + dS A)   _dora_dx_kernel (dropout: one read of W0)
              dA = dSᵀ x̂                                       lora_linear's _lora_bwd_da_kernel

x: [M, in], W0: [out, in], A: [r, in], B: [out, r], m (magnitude), c (lora_B's bias), n, q: [out]. Without
dropout acc_h is acc and y = g ⊙ P + b. q_j = s² · (B_j (A Aᵀ) B_jᵀ + 2 c_j B_j · A 1 + c_j² · in) holds the
norm's terms that do not read W0 ([r, r] and [out, r] products, computed by the launcher); everything that reads
W0 is accumulated in the GEMM's main loop from the W0 tiles it loads anyway. So the training forward reads W0
once where the unfused path reads it twice (W0 Aᵀ for the norm, then the GEMM), and three times with dropout
(PEFT's base GEMM on x̂ as well).

Every program of a column block computes the same V, w2 and n (the same loads and dots in the same order, so
the same bits); the programs of row block 0 store n. The redundancy costs r / BLOCK_M of the main loop's MMA
work per extra row block (at most 25%: r ≤ 64 ≤ BLOCK_M or one row block).

Cancellation (ops/dora.py, CANCEL_EPS): a row with n² < 5 · CANCEL_EPS · w2 gets g = 0 and n = -1 from the GEMM;
the fix-up kernel then recomputes its norm directly, ‖W0_j + s · (B_j A + c_j)‖, and adds g ⊙ P to its column
of y: no host read of a flag, no data-dependent launch. Column blocks without such a row exit after one load.

The norm is in float32 like ops/dora.py's (its V dot in the LoRA compute type: tf32 when x is 16-bit and the
adapters float32, as the LoRA kernels do); in-kernel norms need r ≤ MAX_NORM_RANK (one V tile of
[BLOCK_N, BLOCK_RN] float32 beside the accumulators); larger ranks take n from the launcher's caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_kernels.kernels import lora_linear as kl
from lora_kernels.kernels._common import gemm_tile, keep_mask, mma
from lora_kernels.kernels._launch import Launch
from lora_kernels.kernels.lora_linear import _add_lora

MAX_NORM_RANK = 64  # the widest V tile the forward keeps in registers (see the module docstring)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _dora_gemm_kernel(
    x_ptr, w_ptr, a_ptr, s_ptr, b_ptr, bias_ptr, c_ptr, m_ptr, q_ptr, n_ptr, y_ptr, p_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_pm, stride_pn,
    has_bias, has_c, scaling, cancel, seed, drop_threshold, keep_scale,
    NORM: tl.constexpr, HAS_DROPOUT: tl.constexpr, CT: tl.constexpr, LCT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RN: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N], P[M, N] and (NORM) n[N] of DoRA's forward; see the module docstring. Without NORM, n is read
    (the caller's cached norm). CT: the base GEMM's dot type; LCT: the norm's W0 Aᵀ dot type. S holds x̂ Aᵀ
    already scaled by 1 / (1 - p)."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_rn = tl.arange(0, BLOCK_RN).to(tl.int64)
    mask_rn = offs_rn < R
    v = tl.zeros((BLOCK_N, BLOCK_RN), dtype=tl.float32)
    w2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,  # W0ᵀ tile [BK, BN]
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(xt, wt, acc, CT, PRECISION)
        if HAS_DROPOUT:  # x̂'s mask regenerated over (row, col) of x, as the shrink kernel draws it
            xh = tl.where(keep_mask(seed, drop_threshold, offs_m, k0, K, BLOCK_M, BLOCK_K), xt, 0.0)
            acc_h = mma(xh, wt, acc_h, CT, PRECISION)
        if NORM:
            at = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_rn[None, :] * stride_ar,  # Aᵀ tile [BK, BRN]
                         mask=mask_k[:, None] & mask_rn[None, :], other=0.0)
            v = mma(tl.trans(wt), at, v, LCT, PRECISION)
            wf = wt.to(tl.float32)
            w2 += tl.sum(wf * wf, axis=0)
            wsum += tl.sum(wf, axis=0)
    if HAS_DROPOUT:
        acc_h = acc_h * keep_scale
    else:
        acc_h = acc
    # P = acc_h + s · (S Bᵀ + c): the LoRA expand of lora_linear's epilogue, on the x̂ accumulator.
    p = _add_lora(acc_h, s_ptr, b_ptr, offs_m, offs_n, pid_n.to(tl.int64) * BLOCK_N, mask_m, mask_n, R,
                  stride_sm, stride_sr, stride_br, stride_bn, scaling, seed, drop_threshold, 1.0, N,
                  False, CT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if has_c != 0:
        c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        p += (scaling * c)[None, :]
    mag = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if NORM:
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_rn[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_rn[None, :], other=0.0).to(tl.float32)
        n2 = w2 + 2.0 * scaling * (tl.sum(bt * v, axis=1) + c * wsum) \
            + tl.load(q_ptr + offs_n, mask=mask_n, other=0.0)
        cancels = n2 < cancel * w2
        nrm = tl.sqrt(tl.where(n2 < 0.0, 0.0, n2))  # not tl.maximum: it would turn a NaN n² (an inf in W0) into 0
        g = tl.where(cancels, 0.0, mag / tl.where(mask_n, nrm, 1.0))  # a zero row's m / 0 stays inf, as PEFT's
        if pid_m == 0:
            tl.store(n_ptr + offs_n, tl.where(cancels, -1.0, nrm), mask=mask_n)
    else:
        g = mag / tl.load(n_ptr + offs_n, mask=mask_n, other=1.0)
    y = p * g[None, :]
    if HAS_DROPOUT:
        y += acc - acc_h
    if has_bias != 0:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(p_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, p.to(p_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dora_norm_fixup_kernel(
    w_ptr, a_ptr, b_ptr, c_ptr, m_ptr, n_ptr, y_ptr, p_ptr, M, N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn, stride_pm, stride_pn,
    has_c, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RN: tl.constexpr,
):
    """For the columns j the GEMM flagged (n_j = -1): n_j = ‖W0_j + s · (B_j A + c_j)‖ directly, stored, and
    y[:, j] += (m_j / n_j) · P[:, j]. A program whose columns hold no flag loads n and exits."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nrm = tl.load(n_ptr + offs_n, mask=offs_n < N, other=0.0)
    bad = nrm < 0.0
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        offs_rn = tl.arange(0, BLOCK_RN).to(tl.int64)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_rn[None, :] * stride_br,
                     mask=bad[:, None] & (offs_rn < R)[None, :], other=0.0).to(tl.float32)
        c = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if has_c != 0:
            c = tl.load(c_ptr + offs_n, mask=bad, other=0.0).to(tl.float32)
        n2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=bad[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_rn[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=(offs_rn < R)[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            row = w + scaling * (tl.dot(bt, a, input_precision="ieee") + c[:, None])
            row = tl.where(mask_k[None, :], row, 0.0)
            n2 += tl.sum(row * row, axis=1)
        nrm = tl.sqrt(n2)
        tl.store(n_ptr + offs_n, nrm, mask=bad)
        g = tl.load(m_ptr + offs_n, mask=bad, other=0.0).to(tl.float32) / tl.where(bad, nrm, 1.0)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask = (offs_m < M)[:, None] & bad[None, :]
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
            p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + g[None, :] * p.to(tl.float32)
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _dora_dx_kernel(
    g_ptr, gg_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, M, N, K, R,
    stride_gm, stride_gk, stride_ggm, stride_ggk, stride_wk, stride_wn, stride_dsm, stride_dsr, stride_ar,
    stride_an, stride_dxm, stride_dxn, seed, drop_threshold, keep_scale,
    CT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[M, N=in] = G W0 + m/(1-p) ⊙ ((g ⊙ G) W0 − G W0 + dS A), the dropout mask over (row, col) of x: both
    products from one read of W0 [K=out, N=in]. G, g ⊙ G: [M, out]; dS: [M, r] float32 (scaled by s)."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        mask_mk = mask_m[:, None] & mask_k[None, :]
        gt = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gk, mask=mask_mk, other=0.0)
        ggt = tl.load(gg_ptr + offs_m[:, None] * stride_ggm + offs_k[None, :] * stride_ggk, mask=mask_mk,
                      other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(gt, wt, acc, CT, PRECISION)
        acc_g = mma(ggt, wt, acc_g, CT, PRECISION)
    n_start = pid_n.to(tl.int64) * BLOCK_N
    t = _add_lora(acc_g - acc, ds_ptr, a_ptr, offs_m, offs_n, n_start, mask_m, mask_n, R, stride_dsm, stride_dsr,
                  stride_ar, stride_an, 1.0, seed, drop_threshold, 1.0, N, False, CT, PRECISION,
                  BLOCK_M, BLOCK_N, BLOCK_R)
    keep = keep_mask(seed, drop_threshold, offs_m, n_start, N, BLOCK_M, BLOCK_N)
    dx = acc + tl.where(keep, t * keep_scale, 0.0)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_n[None, :] * stride_dxn, dx.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# Configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by (M class, activation bytes, dropout).
# No split-K (the norm needs the whole reduction in one program), so column blocks are narrow enough for
# ≥ 132 CTAs at out = 4096 from M = 16 up (the static report counts them): 16 columns at decode, 32 at M ≤ 512.
# Dropout keeps a second [BLOCK_M, BLOCK_N] accumulator (x̂ W0ᵀ, or (g ⊙ G) W0 in dx): 8 warps share it.
# --------------------------------------------------------------------------------------------------

_DORA_CONFIGS = {
    ("small", 2, False): (16, 16, 128, 1, 4, 3),
    ("small", 2, True): (16, 16, 64, 1, 4, 4),
    ("medium", 2, False): (64, 32, 64, 8, 4, 3),
    ("medium", 2, True): (64, 32, 64, 8, 8, 3),
    ("large", 2, False): (128, 64, 64, 8, 8, 3),
    ("large", 2, True): (128, 64, 32, 8, 8, 3),
    # float32: exact FMA dots with operands in registers; beside a rank-64 V tile 4 warps spilled 8-24 B (but
    # 32x32 without dropout spilled 8 B at 8 warps on sm_80 and none at 4).
    ("small", 4, False): (16, 16, 64, 1, 8, 3),
    ("small", 4, True): (16, 16, 64, 1, 8, 3),
    ("medium", 4, False): (32, 32, 32, 8, 4, 3),
    ("medium", 4, True): (32, 32, 32, 8, 8, 3),
    ("large", 4, False): (64, 32, 32, 8, 8, 3),
    ("large", 4, True): (64, 32, 32, 8, 8, 3),
}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the fix-up (it runs only for cancelling rows): 64-wide K steps at 4
# warps beside a rank-64 B tile spilled 192-200 B (float32 ieee dot), 32-wide at 4 warps 8 B.
_FIXUP_BLOCKS = (32, 16, 32, 8)


def gemm_configs(M: int, elem_size: int, dropout: bool) -> list[tuple]:
    """The shipped DoRA GEMM configs for M rows of `elem_size`-byte activations: the launcher's pick first."""
    return kl.shipped_configs(_DORA_CONFIGS, M, elem_size, dropout)


def _block_rn(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def norm_terms(A, B, scaling, lora_bias, in_features: int):
    """q [out] float32 = s² · (B_j (A Aᵀ) B_jᵀ + 2 c_j B_j · A 1 + c_j² · in): the norm's terms that do not read
    W0 (an [r, r] and an [out, r] product)."""
    Af, Bf = A.float(), B.float()
    q = torch.linalg.vecdot(torch.mm(Bf, torch.mm(Af, Af.t())), Bf)
    if lora_bias is not None:
        c = lora_bias.float()
        q += c * (2.0 * torch.mv(Bf, Af.sum(1)) + c * in_features)
    return q.mul_(float(scaling) ** 2)


def plan_fwd(x, weight, bias, A, B, magnitude, lora_bias, weight_norm, scaling, dropout_p, seed, cancel_eps,
             deterministic: bool = False, config=None):
    """(launches, y [M, out], S [M, r] float32, P [M, out], n [out] float32) of DoRA's fused forward.
    weight_norm None: n computed in the GEMM (needs r ≤ MAX_NORM_RANK; the fix-up launch follows); else n is
    weight_norm (float32). `config`: one of gemm_configs()."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    # The kernels read the [out] vectors with unit stride (a no-op for the layers' parameters; a strided or
    # expanded magnitude from a direct caller is copied).
    bias, magnitude, lora_bias, weight_norm = (_vec(t) for t in (bias, magnitude, lora_bias, weight_norm))
    launches, S = kl._shrink_plan(x, A, 1.0, dropout_p, seed, deterministic)
    seed_, thr, keep_scale = kl._dropout_args(dropout_p, seed)
    ct, lct, precision = kl._compute_types(x.dtype, A.dtype)
    bm, bn, bk, group_m, warps, stages = config or gemm_configs(M, x.element_size(), thr > 0)[0]
    norm = weight_norm is None
    if norm:
        if R > MAX_NORM_RANK:
            raise ValueError(f"the fused DoRA norm takes ranks up to {MAX_NORM_RANK}, got r={R}: pass weight_norm")
        q = norm_terms(A, B, scaling, lora_bias, K)
        n = kl._alloc((N,), torch.float32, x.device)
    else:
        q, n = weight_norm, weight_norm
    y = kl._alloc((M, N), x.dtype, x.device)
    P = kl._alloc((M, N), x.dtype, x.device)
    block_rn = _block_rn(R) if norm else 16
    launches.append(Launch(
        _dora_gemm_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
        dict(x_ptr=x, w_ptr=weight, a_ptr=A, s_ptr=S, b_ptr=B, bias_ptr=bias if bias is not None else y,
             c_ptr=lora_bias if lora_bias is not None else magnitude, m_ptr=magnitude, q_ptr=q, n_ptr=n, y_ptr=y,
             p_ptr=P, M=M, N=N, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0),
             stride_wk=weight.stride(1), stride_ar=A.stride(0), stride_ak=A.stride(1), stride_sm=S.stride(0),
             stride_sr=S.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1), stride_ym=y.stride(0),
             stride_yn=y.stride(1), stride_pm=P.stride(0), stride_pn=P.stride(1), has_bias=int(bias is not None),
             has_c=int(lora_bias is not None), scaling=float(scaling), cancel=5.0 * cancel_eps, seed=seed_,
             drop_threshold=thr, keep_scale=keep_scale),
        dict(NORM=norm, HAS_DROPOUT=thr > 0, CT=ct, LCT=lct, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn,
             BLOCK_K=bk, BLOCK_R=kl._EPILOGUE_BLOCK_R, BLOCK_RN=block_rn, GROUP_M=group_m),
        num_warps=warps, num_stages=stages))
    if norm:
        fm, fn, fk, fw = _FIXUP_BLOCKS
        launches.append(Launch(
            _dora_norm_fixup_kernel, (triton.cdiv(N, fn),),
            dict(w_ptr=weight, a_ptr=A, b_ptr=B, c_ptr=lora_bias if lora_bias is not None else magnitude,
                 m_ptr=magnitude, n_ptr=n, y_ptr=y, p_ptr=P, M=M, N=N, K=K, R=R, stride_wn=weight.stride(0),
                 stride_wk=weight.stride(1), stride_ar=A.stride(0), stride_ak=A.stride(1), stride_bn=B.stride(0),
                 stride_br=B.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1), stride_pm=P.stride(0),
                 stride_pn=P.stride(1), has_c=int(lora_bias is not None), scaling=float(scaling)),
            dict(BLOCK_M=fm, BLOCK_N=fn, BLOCK_K=fk, BLOCK_RN=block_rn),
            num_warps=fw, num_stages=2))
    return launches, y, S, P, n


def plan_bwd(G, Gg, x, weight, A, B, S, scaling, dropout_p, seed, need_dx: bool, need_dA: bool, need_dB: bool,
             deterministic: bool = False, config=None):
    """(launches, dx, dA, dB) of DoRA's backward on G = dy and Gg = g ⊙ G (both [M, out] in x's dtype): the
    LoRA backward on Gg, with dx from _dora_dx_kernel when dropout is on."""
    launches, dS, dB = kl._ds_db_plan(Gg, B, S, scaling, need_dx or need_dA, need_dB, deterministic)
    dx = dA = None
    seed_, thr, keep_scale = kl._dropout_args(dropout_p, seed)
    if need_dx and thr == 0:
        gemm, dx = kl._gemm_plan(Gg, weight, None, dS, A, tuple(x.shape), 1.0, 0.0, None, A.dtype)
        launches += gemm
    elif need_dx:
        M, K = G.shape
        N = weight.shape[1]
        ct, _, precision = kl._compute_types(G.dtype, A.dtype)
        bm, bn, bk, group_m, warps, stages = config or gemm_configs(M, G.element_size(), True)[0]
        dx = kl._alloc((M, N), x.dtype, x.device)
        launches.append(Launch(
            _dora_dx_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
            dict(g_ptr=G, gg_ptr=Gg, w_ptr=weight, ds_ptr=dS, a_ptr=A, dx_ptr=dx, M=M, N=N, K=K, R=A.shape[0],
                 stride_gm=G.stride(0), stride_gk=G.stride(1), stride_ggm=Gg.stride(0), stride_ggk=Gg.stride(1),
                 stride_wk=weight.stride(0), stride_wn=weight.stride(1), stride_dsm=dS.stride(0),
                 stride_dsr=dS.stride(1), stride_ar=A.stride(0), stride_an=A.stride(1), stride_dxm=dx.stride(0),
                 stride_dxn=dx.stride(1), seed=seed_, drop_threshold=thr, keep_scale=keep_scale),
            dict(CT=ct, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 BLOCK_R=kl._EPILOGUE_BLOCK_R, GROUP_M=group_m),
            num_warps=warps, num_stages=stages))
    if need_dA:
        da, dA = kl._da_plan(dS, x, A, dropout_p, seed, deterministic)
        launches += da
    return launches, dx, dA, dB


def _vec(t):
    return None if t is None else t.contiguous()


def _run(launches) -> None:
    for launch in launches:
        launch.run()


def fix_cancelled_norms(weight, A, B, lora_bias, n, scaling) -> None:
    """n[j] = ‖W0_j + s · (B_j A + c_j)‖ for every j with n[j] = -1 (float32, in place): the fix-up kernel with
    no output rows, for a norm computed apart from the GEMM (no host read of which rows cancel)."""
    fm, fn, fk, fw = _FIXUP_BLOCKS
    N, K = weight.shape
    lora_bias = _vec(lora_bias)
    if not n.is_contiguous():
        raise ValueError(f"fix_cancelled_norms writes n in place with unit stride, got stride {n.stride()}")
    Launch(_dora_norm_fixup_kernel, (triton.cdiv(N, fn),),
           dict(w_ptr=weight, a_ptr=A, b_ptr=B, c_ptr=lora_bias if lora_bias is not None else n, m_ptr=n, n_ptr=n,
                y_ptr=n, p_ptr=n, M=0, N=N, K=K, R=A.shape[0], stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_ar=A.stride(0), stride_ak=A.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1),
                stride_ym=0, stride_yn=0, stride_pm=0, stride_pn=0, has_c=int(lora_bias is not None),
                scaling=float(scaling)),
           dict(BLOCK_M=fm, BLOCK_N=fn, BLOCK_K=fk, BLOCK_RN=_block_rn(A.shape[0])),
           num_warps=fw, num_stages=2).run()


def dora_linear_fwd_triton(x, weight, bias, A, B, magnitude, lora_bias, weight_norm, scaling, dropout_p, seed,
                           cancel_eps, config=None):
    """(y, S, P, n) for 2-D x; see plan_fwd."""
    launches, y, S, P, n = plan_fwd(x, weight, bias, A, B, magnitude, lora_bias, weight_norm, scaling, dropout_p,
                                    seed, cancel_eps, torch.are_deterministic_algorithms_enabled(), config)
    _run(launches)
    return y, S, P, n


def dora_linear_bwd_triton(G, Gg, x, weight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                           config=None):
    """(dx, dA, dB), each None when not needed; see plan_bwd."""
    launches, dx, dA, dB = plan_bwd(G, Gg, x, weight, A, B, S, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                                    torch.are_deterministic_algorithms_enabled(), config)
    _run(launches)
    return dx, dA, dB
