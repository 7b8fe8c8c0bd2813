// Host wrappers (csrc/cuda/launch.cpp) of the LoRA CUDA kernels (csrc/cuda/*.cu), called by the CUDA op
// implementations.
// All of them: run on the current stream, never synchronise with the host, take any row stride for 2-D
// operands whose last dimension is contiguous (stride 1), index with 64-bit offsets, accumulate in fp32.
// Adapter indices `idx` are int64 on the device; a negative index means "no adapter" for that row.
#pragma once

#include "lora_kernels.h"

namespace lora_kernels {
namespace cuda {

// Multi-adapter tensors, all optional (single adapter: none of them): idx [M] int32 slot per row (-1 = no
// adapter), ranks [L] int32 (r_l = clamp(ranks[l], 0, R)), scalings [L] float32, on the device.
struct Slots {
  OptTensor idx, ranks, scalings;
};

// out[m, j] = scale · Σ_k x̂[m, k] · W[l, j, k] for j < r_l, else 0; l = idx[m] (or 0); rows with l < 0 get 0.
//   x: [M, K] (fp16/bf16/fp32), W: [L, R, K] (x's dtype or fp32), out: [M, R] fp32 (any row stride).
//   x̂ = dropout(x) as element (m, k) of [M, K], each element's mask generated once. R <= kShrinkMaxRank.
//   Split-K with fp32 atomics when M is too small for the GPU.
void shrink(const Tensor& x, const Tensor& W, const Slots& slots, const Tensor& out, double scale, const Dropout& d);

// y[m, n] += drop(scale · s_l · Σ_{j<r_l} S[m, j] · W[l, n, j]); l = idx[m] (or 0); rows with l < 0 unchanged.
//   y: [M, N] updated in place (one read, one write), S: [M, R] fp32, W: [L, N, R];
//   drop(v) = v ⊙ keep(m, n) / (1 - p) when d.active (the dx term of the backward), else v.
void expand(const Tensor& y, const Tensor& S, const Tensor& W, const Slots& slots, double scale, const Dropout& d);

// out[n, j] += scale · Σ_m x̂[m, n] · Z[m, j]   (reduction over the long M: dA = dSᵀ x̂ and dB = s · Gᵀ S)
//   X: [M, N], Z: [M, R] fp32, out: [N, R] fp32 view with any strides, zero-initialised by the caller;
//   x̂ = dropout(X) as element (m, n) of [M, N]. Split over M with fp32 atomics.
void outer_acc(const Tensor& X, const Tensor& Z, const Tensor& out, double scale, const Dropout& d);

// out = x̂ for contiguous x and out of one dtype, viewed as [numel / K, K] with K = x.size(-1).
void dropout(const Tensor& x, const Tensor& out, const Dropout& d);

// out += t ⊙ keep / (1 - p) (one shape, any strides; out fp16/bf16/fp32/fp64, t fp32/fp64), the mask of t's
// [numel / K, K] view; `d` active.
void dropout_add(const Tensor& out, const Tensor& t, const Dropout& d, double dropout_p);

// out = keep, out a contiguous bool [M, K] tensor.
void dropout_mask(const Tensor& out, const Dropout& d);

}  // namespace cuda
}  // namespace lora_kernels
