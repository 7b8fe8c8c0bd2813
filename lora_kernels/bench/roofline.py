"""Model shapes and the FLOP / byte formulas every benchmark row is scored with (the one place they live).

Notation: M (or T) tokens, K = in_features, N = out_features, r = LoRA rank, e = bytes per element of
x / W0 / y (2 for bf16), a = bytes per element of the adapter weights, d = distinct adapters in a batch.

The counts are the *work of the operation*, not of a particular implementation: every contender of a
case is scored with the same numbers, so TFLOP/s and GB/s compare like with like, and the bytes are the
compulsory traffic (each operand read once, each result written once) -- what a perfectly fused kernel
would move. The roofline floor of a case is

    floor = max(FLOPs / peak_FLOP/s, bytes / peak_bytes/s)

with both peaks measured once per run (timing.measure_peaks: the best rate over several sizes). "% of peak"
in the report is floor / measured time: 100 % means the kernel runs at the hardware limit of whichever
resource binds.
"""
from __future__ import annotations

from dataclasses import dataclass

# (in_features, out_features, has_bias) of the attention and MLP projections.
MODELS: dict[str, dict[str, tuple[int, int, bool]]] = {
    # hidden 4096, intermediate 14336, 32 query / 8 key-value heads of 128
    "llama3-8b": {"q": (4096, 4096, False), "k": (4096, 1024, False), "v": (4096, 1024, False),
                  "o": (4096, 4096, False), "gate": (4096, 14336, False), "up": (4096, 14336, False),
                  "down": (14336, 4096, False)},
    # hidden 896, intermediate 4864, 14 query / 2 key-value heads of 64; q/k/v carry a bias
    "qwen2-0.5b": {"q": (896, 896, True), "k": (896, 128, True), "v": (896, 128, True),
                   "o": (896, 896, False), "gate": (896, 4864, False), "up": (896, 4864, False),
                   "down": (4864, 896, False)},
}
# k/v and gate/up have the same shapes: the default grid measures each distinct shape once.
DISTINCT_PROJS = ("q", "k", "o", "gate", "down")


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float

    def floor_s(self, peak_flops: float, peak_bytes: float) -> float:
        """Roofline lower bound on the run time in seconds."""
        return max(self.flops / peak_flops, self.bytes / peak_bytes)


def base_gemm_work(M: int, K: int, N: int, e: int, bias: bool, backward: bool) -> Work:
    """y = x W0ᵀ + b, and with `backward` also dx = G W0 (the base weight is frozen: no dW0).

    forward : FLOPs = 2MNK                 bytes = e(MK + NK + MN) [+ eN bias]
    backward: FLOPs += 2MNK                bytes += e(MN + NK + MK)        (read G, W0; write dx)
    """
    flops = 2.0 * M * N * K
    nbytes = e * (M * K + N * K + M * N + (N if bias else 0))
    if backward:
        flops += 2.0 * M * N * K
        nbytes += e * (M * N + N * K + M * K)
    return Work(flops, nbytes)


def lora_linear_work(M: int, K: int, N: int, r: int, e: int, a: int, bias: bool, backward: bool) -> Work:
    """y = x W0ᵀ + b + s (x̂ Aᵀ) Bᵀ; with `backward` also dx, dA, dB (frozen W0, b).

    forward : FLOPs = 2MNK + 2MKr + 2MrN
              bytes = e(MK + NK + MN) + a(rK + Nr) [+ eN]
    backward: dS = sGB (2MNr), dB = sGᵀS (2MNr), dA = dSᵀx̂ (2MrK), dx = GW0 (2MNK) + dS A (2MrK)
              FLOPs += 2MNK + 4MNr + 4MrK
              bytes += e(MN + NK + MK + MK) + 2a(rK + Nr)
                       (read G, W0, x; write dx; read A, B; write dA, dB)
    The [M, r] intermediates (S = x̂Aᵀ, dS) are left out: r is far below K and N. Dropout adds no
    compulsory traffic either: the mask can be regenerated from a seed.
    """
    flops = 2.0 * M * N * K + 2.0 * M * K * r + 2.0 * M * r * N
    nbytes = e * (M * K + N * K + M * N + (N if bias else 0)) + a * (r * K + N * r)
    if backward:
        flops += 2.0 * M * N * K + 4.0 * M * N * r + 4.0 * M * r * K
        nbytes += e * (M * N + N * K + 2 * M * K) + 2 * a * (r * K + N * r)
    return Work(flops, nbytes)


def multi_lora_work(T: int, K: int, N: int, r: int, d: int, e: int, a: int, bias: bool) -> Work:
    """Serving forward: y_t = x_t W0ᵀ + b + s_{j(t)} (x_t A_{j(t)}ᵀ) B_{j(t)}ᵀ over T tokens, d distinct adapters.

    FLOPs = 2TNK + 2TKr + 2TrN
    bytes = e(TK + NK + TN) [+ eN] + d·a(rK + Nr)      (each adapter in use read once)
    """
    flops = 2.0 * T * N * K + 2.0 * T * K * r + 2.0 * T * r * N
    nbytes = e * (T * K + N * K + T * N + (N if bias else 0)) + d * a * (r * K + N * r)
    return Work(flops, nbytes)


def base_only_work(T: int, K: int, N: int, e: int, bias: bool) -> Work:
    """The serving floor: the base GEMM alone (same as base_gemm_work forward)."""
    return base_gemm_work(T, K, N, e, bias, backward=False)


def floor_table(lora_cases, serve_cases, peak_flops: float | None = None, peak_bytes: float | None = None
                ) -> list[dict]:
    """FLOPs, bytes and (given peaks) the floor of the given cases, bf16 activations: `lora_cases` as
    (model, proj, r, M) with fp32 adapters, `serve_cases` as (model, proj, r, phase, T, d) with bf16 adapters.
    `python -m bench --floors` passes the headline cases."""
    rows = []
    for model, proj, r, M in lora_cases:
        K, N, bias = MODELS[model][proj]
        for phase, bwd in (("fwd", False), ("fwd+bwd", True)):
            w = lora_linear_work(M, K, N, r, 2, 4, bias, bwd)
            rows.append(_floor_row(f"{model} {proj} {K}->{N} r={r} M={M} {phase} (bf16 x, fp32 A/B)", w,
                                   peak_flops, peak_bytes))
    for model, proj, r, phase, T, d in serve_cases:
        K, N, bias = MODELS[model][proj]
        w = multi_lora_work(T, K, N, r, d, 2, 2, bias)
        rows.append(_floor_row(f"{model} {proj} {K}->{N} r={r} {phase} T={T} adapters={d} (bf16)", w,
                               peak_flops, peak_bytes))
    return rows


def _floor_row(name: str, w: Work, peak_flops, peak_bytes) -> dict:
    row = {"case": name, "GFLOP": w.flops / 1e9, "MB": w.bytes / 1e6,
           "FLOP/byte": w.flops / w.bytes}
    if peak_flops and peak_bytes:
        row["floor_us"] = w.floor_s(peak_flops, peak_bytes) * 1e6
        row["bound"] = "compute" if w.flops / peak_flops >= w.bytes / peak_bytes else "memory"
    return row
