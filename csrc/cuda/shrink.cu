// Shrink: out[m, j] = scale · Σ_k x̂[m, k] · W[idx[m], j, k]  (S = x̂ Aᵀ of the forward, dS = s · G B of the
// backward, the per-token LoRA-A product of multi-adapter serving).
//
// One warp per (row m, rank j): its 32 lanes stride over K with kVec-element vector loads of x and W (16-byte
// loads for 16-bit types, 4 iterations unrolled so several are in flight), accumulate in fp32 and reduce with
// shuffles. The kShrinkWarps warps of a block take consecutive ranks of one row, so the x row comes from DRAM
// once and from L1 for the others. At decode sizes (M · R small, K long) the host splits K across blockIdx.z
// and the partial sums are added with fp32 atomics into a zeroed `out`.
#include "common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

template <typename Tx, typename Tw, int N>
__global__ void __launch_bounds__(kShrinkWarps * 32) shrink_kernel(ShrinkArgs a) {
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp;
  if (j >= a.R) return;  // whole warps leave; there is no block-level barrier
  const int64_t l = a.idx != nullptr ? a.idx[m] : 0;
  float* o = a.out + m * a.out_rs + j;
  int64_t r = a.R;
  if (l >= 0 && a.ranks != nullptr) r = min(max(static_cast<int64_t>(a.ranks[l]), int64_t{0}), a.R);
  if (l < 0 || j >= r) {  // no adapter for this row, or a rank past this slot's r_l: S is 0
    if (a.splits == 1 && lane == 0) *o = 0.0f;
    return;
  }
  assert(l < a.L);
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.k_chunk;
  const int64_t k_end = k_begin + a.k_chunk < a.K ? k_begin + a.k_chunk : a.K;
  const Tx* xr = static_cast<const Tx*>(a.x) + m * a.x_rs;
  const Tw* wr = static_cast<const Tw*>(a.w) + l * a.w_ls + j * a.w_rs;
  float acc = 0.0f;
  // On the vector path k_begin, k_end and K are multiples of N: a vector never straddles the end.
#pragma unroll 4
  for (int64_t k = k_begin + lane * N; k < k_end; k += 32 * N) {
    float xv[N], wv[N];
    load_f32<N>(xr + k, xv);
    load_f32<N>(wr + k, wv);
    a.d.apply<N>(xv, m, k, a.K);
#pragma unroll
    for (int i = 0; i < N; ++i) acc += xv[i] * wv[i];
  }
  acc = warp_sum(acc) * a.scale;
  if (lane == 0) {
    if (a.splits > 1) {
      atomicAdd(o, acc);
    } else {
      *o = acc;
    }
  }
}

}  // namespace

cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.R == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.M), static_cast<unsigned>((a.R + kShrinkWarps - 1) / kShrinkWarps),
                  static_cast<unsigned>(a.splits));
  return with_types(a.xt, a.wt, [&](auto xtag, auto wtag) {
    using Tx = decltype(xtag);
    using Tw = decltype(wtag);
    if (a.vec) {
      shrink_kernel<Tx, Tw, kVec><<<grid, kShrinkWarps * 32, 0, stream>>>(a);
    } else {
      shrink_kernel<Tx, Tw, 1><<<grid, kShrinkWarps * 32, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_kernels
