// ATen-free interface between the host wrappers (launch.cpp, compiled by the C++ compiler) and the CUDA kernels
// (*.cu, compiled by nvcc without any ATen header, which keeps nvcc fast). Every launcher only enqueues on
// `stream` and returns cudaGetLastError(): no allocation, no synchronisation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "philox.h"

namespace lora_kernels {
namespace cuda {

// F64 only for the standalone dropout ops (dropout_add's operands); the LoRA kernels take the other three.
enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// Elements per vector access: 8 × 2 bytes = one 16-byte load for fp16/bf16, two for fp32. The host picks
// the vector path only when every row start is aligned to 8 elements and the row length is a multiple of 8.
constexpr int kVec = 8;

// ---- shrink: out[m, j] = scale · Σ_k x̂[m, k] · W[l, j, k] for j < r_l, else 0,
//      l = idx[m] (0 without idx; l < 0: the row is 0), r_l = clamp(ranks[l], 0, R) (R without ranks)
// One block per (row, K chunk) computes all ranks: x̂ of a tile of kShrinkTile elements goes to shared memory
// once (8 elements per thread), then the warps take the ranks in turn.
constexpr int kShrinkThreads = 128;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kShrinkTile = kShrinkThreads * kVec;
constexpr int64_t kShrinkMaxRank = 8192;  // the per-rank sums live in shared memory (32 KiB)
struct ShrinkArgs {
  const void* x;         // [M, K], row stride x_rs
  int64_t x_rs;
  DType xt;
  const void* w;         // [L, R, K], strides (w_ls, w_rs, 1)
  int64_t w_ls, w_rs;
  DType wt;              // xt or F32
  const int32_t* idx;    // [M] adapter slot per row, or nullptr
  const int32_t* ranks;  // [L] or nullptr
  float* out;            // [M, R], row stride out_rs; zero-initialised when splits > 1
  int64_t out_rs;
  int64_t M, K, R, L;
  int64_t k_chunk;       // K range per blockIdx.z (a multiple of kShrinkSplitStep)
  int64_t splits;        // ceil(K / k_chunk); > 1 adds partial sums with atomics
  float scale;
  Dropout d;             // on x: element (m, k) of [M, K]
  bool vec;
};
constexpr int64_t kShrinkSplitStep = 32 * kVec;  // granularity of the K chunks (a multiple of kVec and of 4)
cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream);

// ---- expand: y[m, n] += drop(scale · s_l · Σ_{j < r_l} S[m, j] · W[l, n, j]),
//      l = idx[m] (0 without idx; l < 0: row untouched), s_l = scalings[l] (1 without), r_l as in shrink
constexpr int kExpandThreads = 128;
constexpr int64_t kExpandMaxRank = 8192;  // the S row lives in shared memory (32 KiB)
struct ExpandArgs {
  void* y;                // [M, N], row stride y_rs, updated in place
  int64_t y_rs;
  DType yt;
  const float* S;         // [M, R], row stride s_rs
  int64_t s_rs;
  const void* w;          // [L, N, R], strides (w_ls, w_ns, 1)
  int64_t w_ls, w_ns;
  DType wt;               // yt or F32
  const int32_t* idx;     // [M] or nullptr
  const int32_t* ranks;   // [L] or nullptr
  const float* scalings;  // [L] or nullptr
  int64_t M, N, R, L;
  float scale;
  Dropout d;              // on the added term: element (m, n) of [M, N]
  bool vec_y, vec_w;
};
cudaError_t launch_expand(const ExpandArgs& a, cudaStream_t stream);

// ---- outer: out[n, j] += scale · Σ_m x̂[m, n] · Z[m, j]  (out zero-initialised by the caller)
constexpr int kOuterThreads = 128;
constexpr int kOuterRanks = 8;  // ranks per thread
struct OuterArgs {
  const void* x;       // [M, N], row stride x_rs
  int64_t x_rs;
  DType xt;
  const float* z;      // [M, R], row stride z_rs
  int64_t z_rs;
  float* out;          // [N, R] with strides (out_ns, out_js)
  int64_t out_ns, out_js;
  int64_t M, N, R;
  int64_t m_chunk, splits;  // M range per blockIdx.z
  float scale;
  Dropout d;           // on x: element (m, n) of [M, N]
  bool vec;
};
cudaError_t launch_outer(const OuterArgs& a, cudaStream_t stream);

// ---- standalone dropout ops (csrc/cuda/dropout.cu), on contiguous [M, K] tensors, the mask of element (m, k):
// out = x̂ (x and out of one dtype, fp16/bf16/fp32)
cudaError_t launch_dropout(const void* x, void* out, DType dt, int64_t M, int64_t K, Dropout d, bool vec,
                           cudaStream_t stream);
// out += t ⊙ keep · scale (out fp16/bf16/fp32/fp64, t fp32/fp64), computed in fp64 when either is, else fp32
cudaError_t launch_dropout_add(void* out, DType ot, const void* t, DType tt, int64_t M, int64_t K, Dropout d,
                               double scale, cudaStream_t stream);
// out = keep as bool
cudaError_t launch_dropout_mask(bool* out, int64_t M, int64_t K, Dropout d, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_kernels
