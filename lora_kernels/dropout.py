"""Seeded dropout masks that are regenerated, never stored.

Element (m, k) of an [M, K] activation is kept iff ``bits >> 1 >= threshold`` where ``bits`` is output
``k % 4`` of Philox-4x32-10 (Triton's ``tl.randint4x``) at counter ``m * ceil(K/4) + k // 4``: one Philox
call yields the bits of four neighbouring columns, which keeps the kernels' registers (and their cost) a
quarter of one call per element. Groups never straddle rows, so the mask depends only on (seed, M, K, p),
not on any kernel's tile shape. The Triton kernels evaluate this inside their loops; `dropout_mask`
evaluates the same function with plain integer tensor ops, so every backend and the tests see one mask.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# Seeds are drawn in [2**32, 2**62): always a 64-bit kernel argument, so one compiled variant serves all.
SEED_LOW, SEED_HIGH = 2**32, 2**62


def new_seed() -> torch.Tensor:
    """A dropout seed drawn from torch's default CPU generator (so `torch.manual_seed` reproduces a run)."""
    return torch.randint(SEED_LOW, SEED_HIGH, (1,), dtype=torch.int64)


def keep_threshold(p: float) -> int:
    """Integer threshold on 31 random bits: keep iff bits >= threshold, so P(drop) = threshold / 2**31 ~= p."""
    return min(int(round(p * 2**31)), 2**31 - 1)


def _umul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for 32-bit unsigned a (int64 tensor) and constant b, in int64 math."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_hi + ((a * b_lo) >> 16)  # < 2**49: (a * b) >> 16 exactly
    return t >> 16, (a * b) & _MASK32  # int64 multiply wraps mod 2**64, low bits exact


def philox4x32(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four outputs of Philox-4x32-10 for counter (offset low 32 bits, offset high 32 bits, 0, 0) and
    key (seed low 32, seed high 32): what ``tl.randint4x(seed, offsets)`` returns, as int64 in [0, 2**32).
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _umul32(c2, _ROUND_B)
        hi_a, lo_a = _umul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_mask(seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """The boolean keep-mask [M, K] that the kernels regenerate for `seed` and drop probability `p`.

    The kernels index elements by their logical (row, column) in the flattened [M, K] input, whatever the
    memory layout, so the mask depends only on (seed, shape, p). Built by the extension's vectorised
    generator when it is there (tens of times faster), else by `dropout_mask_torch`: the same bits.
    """
    from lora_kernels.backends import NATIVE, NATIVE_CUDA
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if NATIVE is not None and (dev.type == "cpu" or (dev.type == "cuda" and NATIVE_CUDA)):
        if not isinstance(seed, torch.Tensor):
            seed = torch.tensor([seed], dtype=torch.int64)
        return torch.ops.lora_kernels.native_dropout_mask(seed, shape[0], shape[1], p, dev)
    return dropout_mask_torch(seed, shape, p, device)


def dropout_mask_torch(seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """`dropout_mask` computed with plain integer tensor ops (the definition, readable; slow)."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    M, K = shape
    K4 = (K + 3) // 4
    counters = torch.arange(M * K4, dtype=torch.int64, device=device).view(M, K4)
    bits = torch.stack(philox4x32(seed, counters), dim=-1).view(M, K4 * 4)[:, :K]
    return (bits >> 1) >= keep_threshold(p)
