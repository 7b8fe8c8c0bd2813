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
# Multi-adapter (serving): one adapter slot per token. Plain per-token loops, the spec for
# lora_kernels/ops/multi_lora.py.
#
#   A_stacks[i]: [L, R, in], B_stacks[i]: [L, out_i, R], scalings: [L], ranks: [L] (None = R),
#   token_adapter: [T] with -1 = no adapter; r_l = clamp(ranks[l], 0, R).
#   S[t, i·R + j] = x[t] · A_i[l, j] (j < r_l), y[t, c_i + n] += s_l · Σ_{j<r_l} S[t, i·R + j] B_i[l, n, j]
# ====================================================================================================

def _multi_ranks(ranks, L: int, R: int) -> list[int]:
    if ranks is None:
        return [R] * L
    return [min(max(int(r), 0), R) for r in torch.as_tensor(ranks).tolist()]


def multi_lora_shrink(x, A_stacks, token_adapter, ranks=None):
    """S [T, NS·R] in the compute dtype; rows of -1 tokens and columns past a slot's rank are 0."""
    A_stacks = [A_stacks] if isinstance(A_stacks, torch.Tensor) else list(A_stacks)
    dt = _compute_dtype(x, *A_stacks)
    L, R, _ = A_stacks[0].shape
    rk = _multi_ranks(ranks, L, R)
    S = torch.zeros(x.shape[0], len(A_stacks) * R, dtype=dt, device=x.device)
    for t, l in enumerate(torch.as_tensor(token_adapter).tolist()):
        if l < 0:
            continue
        for i, A in enumerate(A_stacks):
            S[t, i * R:i * R + rk[l]] = A[l, :rk[l]].to(dt) @ x[t].to(dt)
    return S


def multi_lora_delta(x, A_stacks, B_stacks, scalings, token_adapter, ranks=None):
    """The LoRA term [T, Σ out_i] that multi-adapter expand adds to y."""
    A_stacks = [A_stacks] if isinstance(A_stacks, torch.Tensor) else list(A_stacks)
    B_stacks = [B_stacks] if isinstance(B_stacks, torch.Tensor) else list(B_stacks)
    S = multi_lora_shrink(x, A_stacks, token_adapter, ranks)
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


def multi_lora_linear_forward(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks=None):
    """y = x W0ᵀ + b + the per-token LoRA term, in the compute dtype (x: [T, in])."""
    dt = _compute_dtype(x, weight)
    y = x.to(dt) @ weight.to(dt).T
    if bias is not None:
        y = y + bias.to(dt)
    return y + multi_lora_delta(x, A_stacks, B_stacks, scalings, token_adapter, ranks).to(dt)
