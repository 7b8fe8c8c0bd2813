// Expand: y[m, n] += drop(scale · s_l · Σ_{j<r_l} S[m, j] · W[l, n, j]) in place (y read once, written once),
// l = idx[m].
//
// Expand: one block per (row m, kVec · 128 columns). The block stages the fp32 row S[m, :r_l] · scale · s_l in
// shared memory; each thread owns kVec consecutive outputs, reads its kVec rows of W (one contiguous stretch
// when W is [N, R] row-major, so a warp reads one contiguous stretch of W) with vector loads, accumulates in
// fp32 and does one vector read-modify-write of y. W is LoRA-B ([out, r]) in the forward and Aᵀ ([in, r]) for
// the dx term of the backward, where `drop` applies the dropout mask to element (m, n) of [M, N].
#include "common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

template <typename Ty, typename Tw, int N, int NW>
__global__ void __launch_bounds__(kExpandThreads) expand_kernel(ExpandArgs a) {
  extern __shared__ float s_row[];
  const int64_t m = blockIdx.x;
  const int64_t l = a.idx != nullptr ? a.idx[m] : 0;
  if (l < 0) return;  // no adapter for this row: y stays as it is (uniform over the block)
  assert(l < a.L);
  const int64_t r = a.ranks != nullptr ? min(max(static_cast<int64_t>(a.ranks[l]), int64_t{0}), a.R) : a.R;
  if (r == 0) return;  // slot without an adapter in this layer
  const float scale = a.scalings != nullptr ? a.scale * a.scalings[l] : a.scale;
  for (int64_t j = threadIdx.x; j < r; j += kExpandThreads) s_row[j] = a.S[m * a.s_rs + j] * scale;
  __syncthreads();
  const int64_t n0 = (static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x) * N;
  if (n0 >= a.N) return;  // on the vector path N % kVec == 0, so n0 < N covers all N outputs of the thread
  const Tw* wl = static_cast<const Tw*>(a.w) + l * a.w_ls;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const Tw* row = wl + (n0 + i) * a.w_ns;
    float s = 0.0f;
    int64_t j = 0;
    if constexpr (NW > 1) {  // rows aligned to NW elements; the tail past the last full vector is scalar
      for (; j + NW <= r; j += NW) {
        float wv[NW];
        load_f32<NW>(row + j, wv);
#pragma unroll
        for (int t = 0; t < NW; ++t) s += s_row[j + t] * wv[t];
      }
    }
    for (; j < r; ++j) s += s_row[j] * to_f32(row[j]);
    acc[i] = s;
  }
  a.d.apply<N>(acc, m, n0, a.N);
  Ty* yp = static_cast<Ty*>(a.y) + m * a.y_rs + n0;
  float yv[N];
  load_f32<N>(yp, yv);
#pragma unroll
  for (int i = 0; i < N; ++i) yv[i] += acc[i];
  store_f32<N>(yp, yv);
}

}  // namespace

cudaError_t launch_expand(const ExpandArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0 || a.R == 0) return cudaSuccess;
  const int64_t per_block = kExpandThreads * (a.vec_y ? kVec : 1);
  const dim3 grid(static_cast<unsigned>(a.M), static_cast<unsigned>((a.N + per_block - 1) / per_block));
  const size_t smem = static_cast<size_t>(a.R) * sizeof(float);
  return with_types(a.yt, a.wt, [&](auto ytag, auto wtag) {
    using Ty = decltype(ytag);
    using Tw = decltype(wtag);
    if (a.vec_y && a.vec_w) {
      expand_kernel<Ty, Tw, kVec, kVec><<<grid, kExpandThreads, smem, stream>>>(a);
    } else if (a.vec_y) {
      expand_kernel<Ty, Tw, kVec, 1><<<grid, kExpandThreads, smem, stream>>>(a);
    } else if (a.vec_w) {
      expand_kernel<Ty, Tw, 1, kVec><<<grid, kExpandThreads, smem, stream>>>(a);
    } else {
      expand_kernel<Ty, Tw, 1, 1><<<grid, kExpandThreads, smem, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_kernels
