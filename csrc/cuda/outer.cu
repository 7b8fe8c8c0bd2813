// Outer-product accumulation over the long dimension M: out[n, j] += scale · Σ_m x̂[m, n] · Z[m, j].
// The weight gradients of the backward: dA = dSᵀ x̂ (X = x with the dropout mask, Z = dS) and dB = s · Gᵀ S
// (X = dy, Z = S), with fp32 accumulation and no x̂ or fp32 copy of dy in memory.
//
// Each thread owns kVec consecutive columns n (one vector load of X per row) and kOuterRanks ranks j (the same
// Z[m, j0 : j0 + 8] for every thread of the block: a broadcast from L1), so it keeps kVec × 8 fp32
// accumulators. blockIdx.z splits M so that the grid fills the GPU; partial sums go to `out` by fp32 atomics.
#include "common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

template <typename Tx, int N>
__global__ void __launch_bounds__(kOuterThreads) outer_kernel(OuterArgs a) {
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kOuterThreads + threadIdx.x) * N;
  if (n0 >= a.N) return;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kOuterRanks;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * a.m_chunk;
  const int64_t m_end = m_begin + a.m_chunk < a.M ? m_begin + a.m_chunk : a.M;
  const Tx* x = static_cast<const Tx*>(a.x);
  float acc[N][kOuterRanks];
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int t = 0; t < kOuterRanks; ++t) acc[i][t] = 0.0f;
#pragma unroll 2
  for (int64_t m = m_begin; m < m_end; ++m) {
    float xv[N], zv[kOuterRanks];
    load_f32<N>(x + m * a.x_rs + n0, xv);
    a.d.apply<N>(xv, m, n0, a.N);
#pragma unroll
    for (int t = 0; t < kOuterRanks; ++t) zv[t] = j0 + t < a.R ? a.z[m * a.z_rs + j0 + t] : 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int t = 0; t < kOuterRanks; ++t) acc[i][t] += xv[i] * zv[t];
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int t = 0; t < kOuterRanks; ++t)
      if (j0 + t < a.R) atomicAdd(a.out + (n0 + i) * a.out_ns + (j0 + t) * a.out_js, acc[i][t] * a.scale);
}

}  // namespace

cudaError_t launch_outer(const OuterArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0 || a.R == 0) return cudaSuccess;
  const int64_t per_block = kOuterThreads * (a.vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((a.N + per_block - 1) / per_block),
                  static_cast<unsigned>((a.R + kOuterRanks - 1) / kOuterRanks), static_cast<unsigned>(a.splits));
  return with_type(a.xt, [&](auto tag) {
    using Tx = decltype(tag);
    if (a.vec) {
      outer_kernel<Tx, kVec><<<grid, kOuterThreads, 0, stream>>>(a);
    } else {
      outer_kernel<Tx, 1><<<grid, kOuterThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_kernels
