// Shrink: out[m, j] = scale · Σ_k x̂[m, k] · W[idx[m], j, k]  (S = x̂ Aᵀ of the forward, dS = s · G B of the
// backward, the per-token LoRA-A product of multi-adapter serving).
//
// One block per (row m, K chunk) computes all r ranks of the row, so each element's dropout mask is generated
// once (a warp per (row, rank) ran Philox over the whole row R times: ~19 instructions per element per rank).
// The block walks its K chunk in tiles of kShrinkTile elements:
//   1. fill: each thread loads 8 consecutive elements of x (one 16-byte load for 16-bit types, two for fp32, or
//      8 scalar loads off the vector path), applies the mask (two Philox calls) and stores x̂ as fp32 in shared
//      memory;
//   2. dot: warp w takes ranks w, w + 4, ...; its lanes read their slice of the rank's W row (vector loads) and of
//      x̂ (shared memory), accumulate in fp32, reduce with shuffles, and lane 0 adds the tile's sum to the rank's
//      running total in shared memory (each rank has one owner: no races, a fixed order, no atomics).
// At decode sizes (few rows, long K) the host splits K across blockIdx.z and the partial sums are added with
// fp32 atomics into a zeroed `out`.
#include "common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr int kPerThread = kShrinkTile / kShrinkThreads;  // elements per thread in the fill (8)
static_assert(kPerThread == kVec, "the fill loads one kVec vector per thread");

template <typename Tx, typename Tw, bool kVecPath>
__global__ void __launch_bounds__(kShrinkThreads) shrink_kernel(ShrinkArgs a) {
  extern __shared__ float smem[];
  float* s_x = smem;                 // [kShrinkTile] x̂ of the current tile
  float* s_acc = smem + kShrinkTile;  // [R] running sum per rank
  const int64_t m = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t l = a.idx != nullptr ? a.idx[m] : 0;
  int64_t r = a.R;
  if (l >= 0 && a.ranks != nullptr) r = min(max(static_cast<int64_t>(a.ranks[l]), int64_t{0}), a.R);
  float* o = a.out + m * a.out_rs;
  if (l < 0 || r == 0) {  // no adapter for this row (uniform over the block): S is 0
    if (a.splits == 1) {
      for (int64_t j = tid; j < a.R; j += kShrinkThreads) o[j] = 0.0f;
    }
    return;
  }
  assert(l < a.L);
  for (int64_t j = tid; j < r; j += kShrinkThreads) s_acc[j] = 0.0f;  // published by the first barrier below
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.k_chunk;
  const int64_t k_end = k_begin + a.k_chunk < a.K ? k_begin + a.k_chunk : a.K;
  const Tx* xr = static_cast<const Tx*>(a.x) + m * a.x_rs;
  const Tw* wl = static_cast<const Tw*>(a.w) + l * a.w_ls;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kShrinkTile) {
    // 1. x̂ of this tile into shared memory, each element's mask generated once (k is a multiple of 4).
    {
      const int64_t k = k0 + tid * kPerThread;
      float v[kPerThread];
      if constexpr (kVecPath) {  // k_end and K are multiples of kVec here: a vector never straddles the end
        if (k < k_end) {
          load_f32<kPerThread>(xr + k, v);
        } else {
#pragma unroll
          for (int i = 0; i < kPerThread; ++i) v[i] = 0.0f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) v[i] = k + i < k_end ? to_f32(xr[k + i]) : 0.0f;
      }
      if (k < k_end) a.d.apply<kPerThread>(v, m, k, a.K);
      float4* dst = reinterpret_cast<float4*>(s_x + tid * kPerThread);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();
    // 2. every rank against the tile; a warp owns ranks warp, warp + kShrinkWarps, ...
    const int64_t n_tile = k_end - k0 < kShrinkTile ? k_end - k0 : kShrinkTile;
    for (int64_t j = warp; j < r; j += kShrinkWarps) {
      const Tw* wr = wl + j * a.w_rs + k0;
      float acc = 0.0f;
      if constexpr (kVecPath) {
#pragma unroll 2
        for (int64_t kk = lane * kVec; kk < n_tile; kk += 32 * kVec) {
          float wv[kVec];
          load_f32<kVec>(wr + kk, wv);
          const float4 x0 = *reinterpret_cast<const float4*>(s_x + kk);
          const float4 x1 = *reinterpret_cast<const float4*>(s_x + kk + 4);
          acc += x0.x * wv[0] + x0.y * wv[1] + x0.z * wv[2] + x0.w * wv[3];
          acc += x1.x * wv[4] + x1.y * wv[5] + x1.z * wv[6] + x1.w * wv[7];
        }
      } else {
#pragma unroll 4
        for (int64_t kk = lane; kk < n_tile; kk += 32) acc += s_x[kk] * to_f32(wr[kk]);
      }
      acc = warp_sum(acc);
      if (lane == 0) s_acc[j] += acc;
    }
    __syncthreads();  // s_x is refilled next; s_acc complete after the last tile
  }
  for (int64_t j = tid; j < a.R; j += kShrinkThreads) {
    if (j < r) {
      const float v = s_acc[j] * a.scale;
      if (a.splits > 1) {
        atomicAdd(o + j, v);
      } else {
        o[j] = v;
      }
    } else if (a.splits == 1) {
      o[j] = 0.0f;  // ranks past this slot's r_l
    }
  }
}

}  // namespace

cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.R == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.M), 1, static_cast<unsigned>(a.splits));
  const size_t smem = (static_cast<size_t>(kShrinkTile) + static_cast<size_t>(a.R)) * sizeof(float);
  return with_types(a.xt, a.wt, [&](auto xtag, auto wtag) {
    using Tx = decltype(xtag);
    using Tw = decltype(wtag);
    if (a.vec) {
      shrink_kernel<Tx, Tw, true><<<grid, kShrinkThreads, smem, stream>>>(a);
    } else {
      shrink_kernel<Tx, Tw, false><<<grid, kShrinkThreads, smem, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_kernels
