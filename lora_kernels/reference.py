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
