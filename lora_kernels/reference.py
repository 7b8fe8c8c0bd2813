"""Plain PyTorch definitions of every op in this package. They define "correct" for the tests.

Single-adapter LoRA linear (PEFT layout):
    x: [M, in], weight W0: [out, in], bias b: [out] | None, A: [r, in], B: [out, r], scaling s,
    keep mask m: [M, in] (bool) and drop probability p when dropout is active.

    x̂  = x ⊙ m / (1 - p)                      (x̂ = x without dropout)
    S  = x̂ Aᵀ                                  [M, r]
    y  = x W0ᵀ + b + s · S Bᵀ                   [M, out]

    backward with G = dy:
    dS = s · G B,  dB = s · Gᵀ S,  dA = dSᵀ x̂,  dx = G W0 + (dS A) ⊙ m / (1 - p)

Everything here computes in the widest dtype of its inputs (at least float32) and is meant to be called
with float64 tensors by the tests.
"""
from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def apply_dropout(x: torch.Tensor, keep_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """x̂ = x ⊙ m / (1 - p), or x when there is no mask."""
    if keep_mask is None:
        return x
    return x * keep_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0):
    """Returns (y, S) for x: [M, in]. y has the compute dtype (cast it to compare)."""
    dt = _compute_dtype(x, weight, lora_A, lora_B)
    x, weight, lora_A, lora_B = (t.to(dt) for t in (x, weight, lora_A, lora_B))
    S = apply_dropout(x, keep_mask, dropout_p) @ lora_A.T
    y = x @ weight.T + scaling * (S @ lora_B.T)
    if bias is not None:
        y = y + bias.to(dt)
    return y, S


def lora_linear_backward(dy, x, weight, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0):
    """Returns (dx, dA, dB) by the formulas in the module docstring."""
    dt = _compute_dtype(dy, x, weight, lora_A, lora_B)
    G, x, weight, lora_A, lora_B = (t.to(dt) for t in (dy, x, weight, lora_A, lora_B))
    x_hat = apply_dropout(x, keep_mask, dropout_p)
    S = x_hat @ lora_A.T
    dS = scaling * (G @ lora_B)
    dB = scaling * (G.T @ S)
    dA = dS.T @ x_hat
    dx = G @ weight + apply_dropout(dS @ lora_A, keep_mask, dropout_p)
    return dx, dA, dB


# ====================================================================================================
# Multi-adapter: one adapter slot per token. Plain per-token loops, the spec for
# lora_kernels/ops/multi_lora.py.
#
#   A_stacks[i]: [L, R, in], B_stacks[i]: [L, out_i, R], scalings: [L], ranks: [L] (None = R),
#   token_adapter: [T] with -1 = no adapter; r_l = clamp(ranks[l], 0, R).
#   Dropout (optional): keep_mask m [T, in] (bool) and per-slot probabilities dropout_p [L];
#   x̂[t] = x[t] ⊙ m[t] / (1 - p_l) for l = token_adapter[t] (x̂ = x without dropout).
#   S[t, i·R + j] = x̂[t] · A_i[l, j] (j < r_l), y[t, c_i + n] += s_l · Σ_{j<r_l} S[t, i·R + j] B_i[l, n, j]
#
#   backward with G = dy, c_i = Σ_{k<i} out_k, for tokens t of slot l >= 0 and j < r_l:
#   dS[t, i·R + j] = s_l · Σ_n G[t, c_i + n] B_i[l, n, j]
#   dB_i[l, n, j]  = s_l · Σ_{t of l} G[t, c_i + n] S[t, i·R + j]
#   dA_i[l, j, k]  = Σ_{t of l} dS[t, i·R + j] x̂[t, k]
#   dx[t]          = G[t] W0 + (Σ_i Σ_{j<r_l} dS[t, i·R + j] A_i[l, j]) ⊙ m[t] / (1 - p_l)
#   Everything else of dA / dB is 0 (rows past r_l, slots without tokens); a -1 token has dx[t] = G[t] W0.
# ====================================================================================================

def _multi_ranks(ranks, L: int, R: int) -> list[int]:
    if ranks is None:
        return [R] * L
    return [min(max(int(r), 0), R) for r in torch.as_tensor(ranks).tolist()]


def _slot_probs(dropout_p, L: int) -> list[float]:
    if dropout_p is None:
        return [0.0] * L
    p = torch.as_tensor(dropout_p, dtype=torch.float64).tolist()
    return p if isinstance(p, list) else [p] * L


def multi_lora_x_hat(x, token_adapter, keep_mask=None, dropout_p=None):
    """x̂ [T, in] in x's dtype: row t is x[t] ⊙ m[t] / (1 - p_l) for its slot l (x[t] when l < 0 or no mask)."""
    if keep_mask is None:
        return x
    ta = torch.as_tensor(token_adapter).tolist()
    ps = _slot_probs(dropout_p, max(ta, default=-1) + 1)
    out = x.clone()
    for t, l in enumerate(ta):
        if l >= 0:
            out[t] = x[t] * keep_mask[t].to(x.dtype) / (1.0 - ps[l])
    return out


def multi_lora_shrink(x, A_stacks, token_adapter, ranks=None, keep_mask=None, dropout_p=None):
    """S [T, NS·R] in the compute dtype; rows of -1 tokens and columns past a slot's rank are 0."""
    A_stacks = [A_stacks] if isinstance(A_stacks, torch.Tensor) else list(A_stacks)
    dt = _compute_dtype(x, *A_stacks)
    L, R, _ = A_stacks[0].shape
    rk = _multi_ranks(ranks, L, R)
    x = multi_lora_x_hat(x, token_adapter, keep_mask, dropout_p)
    S = torch.zeros(x.shape[0], len(A_stacks) * R, dtype=dt, device=x.device)
    for t, l in enumerate(torch.as_tensor(token_adapter).tolist()):
        if l < 0:
            continue
        for i, A in enumerate(A_stacks):
            S[t, i * R:i * R + rk[l]] = A[l, :rk[l]].to(dt) @ x[t].to(dt)
    return S


def multi_lora_delta(x, A_stacks, B_stacks, scalings, token_adapter, ranks=None, keep_mask=None, dropout_p=None):
    """The LoRA term [T, Σ out_i] that multi-adapter expand adds to y."""
    A_stacks = [A_stacks] if isinstance(A_stacks, torch.Tensor) else list(A_stacks)
    B_stacks = [B_stacks] if isinstance(B_stacks, torch.Tensor) else list(B_stacks)
    S = multi_lora_shrink(x, A_stacks, token_adapter, ranks, keep_mask, dropout_p)
    return multi_lora_expand_delta(S, B_stacks, scalings, token_adapter, ranks)


def multi_lora_expand_delta(S, B_stacks, scalings, token_adapter, ranks=None):
    """Σ over slices of s_l · S[t, slice i] B_i[l]ᵀ, per token, as a [T, Σ out_i] tensor."""
    B_stacks = [B_stacks] if isinstance(B_stacks, torch.Tensor) else list(B_stacks)
    dt = _compute_dtype(S, *B_stacks)
    L, _, R = B_stacks[0].shape
    rk = _multi_ranks(ranks, L, R)
    sc = torch.as_tensor(scalings, dtype=torch.float64).tolist()
    sc = sc if isinstance(sc, list) else [sc] * L
    widths = [B.shape[1] for B in B_stacks]
    out = torch.zeros(S.shape[0], sum(widths), dtype=dt, device=S.device)
    for t, l in enumerate(torch.as_tensor(token_adapter).tolist()):
        if l < 0:
            continue
        col = 0
        for i, B in enumerate(B_stacks):
            r = rk[l]
            out[t, col:col + widths[i]] = sc[l] * (B[l, :, :r].to(dt) @ S[t, i * R:i * R + r].to(dt))
            col += widths[i]
    return out


def multi_lora_linear_forward(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks=None,
                              keep_mask=None, dropout_p=None):
    """y = x W0ᵀ + b + the per-token LoRA term (of x̂ when keep_mask is given), in the compute dtype (x: [T, in])."""
    dt = _compute_dtype(x, weight)
    y = x.to(dt) @ weight.to(dt).T
    if bias is not None:
        y = y + bias.to(dt)
    return y + multi_lora_delta(x, A_stacks, B_stacks, scalings, token_adapter, ranks, keep_mask, dropout_p).to(dt)


def multi_lora_linear_backward(dy, x, weight, A_stacks, B_stacks, scalings, token_adapter, ranks=None,
                               keep_mask=None, dropout_p=None):
    """(dx [T, in], [dA_i [L, R, in]], [dB_i [L, out_i, R]]) by the per-token formulas above, in the compute
    dtype. keep_mask: [T, in] bool or None; dropout_p: [L] per-slot probabilities (or one float)."""
    A_stacks = [A_stacks] if isinstance(A_stacks, torch.Tensor) else list(A_stacks)
    B_stacks = [B_stacks] if isinstance(B_stacks, torch.Tensor) else list(B_stacks)
    dt = _compute_dtype(dy, x, weight, *A_stacks, *B_stacks)
    G, x, weight = dy.to(dt), x.to(dt), weight.to(dt)
    A_stacks, B_stacks = [a.to(dt) for a in A_stacks], [b.to(dt) for b in B_stacks]
    L, R, _ = A_stacks[0].shape
    rk = _multi_ranks(ranks, L, R)
    sc = torch.as_tensor(scalings, dtype=torch.float64).tolist()
    sc = sc if isinstance(sc, list) else [sc] * L
    ps = _slot_probs(dropout_p, L)
    dx = G @ weight
    dA = [torch.zeros_like(a) for a in A_stacks]
    dB = [torch.zeros_like(b) for b in B_stacks]
    for t, l in enumerate(torch.as_tensor(token_adapter).tolist()):
        if l < 0:
            continue
        r, s = rk[l], sc[l]
        keep = 1.0 if keep_mask is None else keep_mask[t].to(dt) / (1.0 - ps[l])
        x_hat = x[t] * keep
        col, lora_dx = 0, torch.zeros_like(x[t])
        for i, (A, B) in enumerate(zip(A_stacks, B_stacks)):
            g = G[t, col:col + B.shape[1]]
            col += B.shape[1]
            S = A[l, :r] @ x_hat                       # [r]
            dS = s * (B[l, :, :r].T @ g)               # [r]
            dB[i][l, :, :r] += s * torch.outer(g, S)
            dA[i][l, :r] += torch.outer(dS, x_hat)
            lora_dx += A[l, :r].T @ dS
        dx[t] += lora_dx * keep
    return dx, dA, dB


# ====================================================================================================
# DoRA (weight-decomposed LoRA), PEFT's exact semantics. The spec for lora_kernels/ops/dora.py.
#
#   magnitude m: [out], lora_bias c: [out] | None (the bias of PEFT's lora_B when lora_bias=True), x̂ as above.
#   L   = B A + c 1ᵀ                                   [out, in]  (PEFT forms B A through lora_B's forward, so
#                                                                  its bias lands on every column)
#   n   = ‖W0 + s · L‖ per row, detached              [out]      (DoRA §4.3: no gradient through the norm)
#   g   = m / n                                        [out]
#   y   = x W0ᵀ + b + (g − 1) ⊙ (x̂ W0ᵀ) + g ⊙ s · (x̂ Aᵀ Bᵀ + c)
#       = g ⊙ (x W0ᵀ + s · (x Aᵀ Bᵀ + c)) + b        without dropout
# ====================================================================================================

def dora_weight_norm(weight, lora_A, lora_B, scaling, lora_bias=None):
    """n = ‖W0 + s · (B A + c 1ᵀ)‖ per row, built as the [out, in] matrix (the direct form), compute dtype."""
    dt = _compute_dtype(weight, lora_A, lora_B)
    L = lora_B.to(dt) @ lora_A.to(dt)
    if lora_bias is not None:
        L = L + lora_bias.to(dt)[:, None]
    return torch.linalg.vector_norm(weight.to(dt) + scaling * L, dim=1)


def dora_linear_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, keep_mask=None, dropout_p=0.0,
                        lora_bias=None):
    """y [M, out] in the compute dtype for x: [M, in], by the formula above. Differentiable in x, A, B, m and c
    (the norm detached), so autograd on float64 inputs gives the reference gradients."""
    dt = _compute_dtype(x, weight, lora_A, lora_B, magnitude)
    x, weight, lora_A, lora_B, magnitude = (t.to(dt) for t in (x, weight, lora_A, lora_B, magnitude))
    c = None if lora_bias is None else lora_bias.to(dt)
    g = magnitude / dora_weight_norm(weight, lora_A, lora_B, scaling, c).detach()
    x_hat = apply_dropout(x, keep_mask, dropout_p)
    lora = x_hat @ lora_A.T @ lora_B.T
    if c is not None:
        lora = lora + c
    y = x @ weight.T + (g - 1) * (x_hat @ weight.T) + g * scaling * lora
    if bias is not None:
        y = y + bias.to(dt)
    return y


# ====================================================================================================
# Quantized base weights (QLoRA), in the layout bitsandbytes stores. The spec for lora_kernels/quant.py and
# lora_kernels/ops/qlora.py; bit-exact with bitsandbytes' own dequantization.
#
#   4-bit ("nf4" / "fp4"), weight [out, in] flattened row-major to n = out · in values w[i]:
#     codes   uint8 [⌈n/2⌉]: w[2j] is the high nibble of codes[j], w[2j+1] the low one
#     absmax  float32 [⌈n/64⌉]: one scale per block of 64 consecutive values (blocks cross rows when in % 64 ≠ 0)
#     w[i]   = fp32(TABLE[code(i)] · absmax[i // 64]), then rounded to the weight's dtype
#   nested ("double quantization") absmax: uint8 q [⌈n/64⌉] with its own float32 scales a2 [⌈n/64/256⌉],
#     a 256-entry float32 code table and a float32 offset:  absmax[b] = fp32(code2[q[b]] · a2[b // 256]) + offset
#   8-bit row-wise ("int8_row", bitsandbytes' Linear8bitLt): int8 C [out, in], float32 row scales s [out]:
#     w[o, k] = fp32(fp32(C[o, k] · s[o]) · (1/127))
# ====================================================================================================

# The 16-entry value tables of the 4-bit formats, index = the 4-bit code. NF4: the normal-float levels of the
# QLoRA paper (Dettmers et al. 2023, appendix E); FP4: sign + 2-bit exponent + 1-bit mantissa, normalised to
# a largest magnitude of 1. Rounded to float32 when used.
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
FP4_TABLE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
INT8_ROW_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it (rounded to float32 when applied)


def quant_table(quant_type: str, device=None) -> torch.Tensor:
    """The [16] float32 value table of "nf4" or "fp4"."""
    values = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}[quant_type]
    return torch.tensor(values, dtype=torch.float32, device=device)


def dequantize_absmax(q_absmax, nested_absmax, nested_code, nested_offset, nested_blocksize=256):
    """absmax [nb] float32 from its nested form: code2[q] · a2[b // nested_blocksize] + offset."""
    idx = torch.arange(q_absmax.numel(), device=q_absmax.device) // nested_blocksize
    return nested_code.float()[q_absmax.reshape(-1).long()] * nested_absmax.float()[idx] + nested_offset.float()


def dequantize_4bit(codes, absmax, quant_type, shape, dtype=torch.float32, blocksize=64):
    """W [out, in] in `dtype` from packed 4-bit codes and float32 absmax (nested absmax: `dequantize_absmax`)."""
    n = shape[0] * shape[1]
    q = codes.reshape(-1).to(torch.int64)
    idx = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n]
    scale = absmax.float()[torch.arange(n, device=codes.device) // blocksize]
    return (quant_table(quant_type, codes.device)[idx] * scale).reshape(shape).to(dtype)


def dequantize_int8_row(codes, scales, dtype=torch.float32):
    """W [out, in] in `dtype` from int8 codes [out, in] and float32 row scales [out]."""
    return (codes.float() * scales.float()[:, None] * INT8_ROW_SCALE).to(dtype)
