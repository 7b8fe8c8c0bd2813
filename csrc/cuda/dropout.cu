// The standalone dropout ops on contiguous [M, K] tensors (native_dropout, native_dropout_add_,
// native_dropout_mask); the LoRA kernels apply the same mask inside their own loops (philox.h).
//   dropout:      out = x ⊙ keep / (1 - p), kVec elements per thread (one 16-byte load for 16-bit types);
//   dropout_add:  out += t ⊙ keep / (1 - p), one Philox group (4 columns) per thread, grid-stride;
//   dropout_mask: the keep flags as bool, likewise.
// Simple element-wise kernels: they only have to be correct and read each element once.
#include <type_traits>

#include "common.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

// out = x̂ for contiguous [M, K]; blockIdx.y strides over rows (M may exceed the grid's 65535 limit).
template <typename T, int N>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t M, int64_t K, Dropout d) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  if (k >= K) return;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    float v[N];
    load_f32<N>(x + m * K + k, v);
    d.apply<N>(v, m, k, K);
    store_f32<N>(out + m * K + k, v);
  }
}

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<Acc>(v);
  } else {
    return static_cast<Acc>(to_f32(v));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(v);
  } else {
    return from_f32<T>(static_cast<float>(v));
  }
}

constexpr int kThreads = 256;

// Calls f(i) for every Philox group i < G = M · ceil(K / 4) (grid-stride).
#define LK_FOR_EACH_GROUP(G, i)                                                                           \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < (G);                   \
       i += static_cast<int64_t>(gridDim.x) * kThreads)

template <typename To, typename Tt, typename Acc>
__global__ void __launch_bounds__(kThreads) dropout_add_kernel(To* __restrict__ out, const Tt* __restrict__ t,
                                                              int64_t M, int64_t K, Dropout d, Acc scale) {
  const int64_t K4 = (K + 3) / 4;
  LK_FOR_EACH_GROUP(M * K4, g) {
    const int64_t m = g / K4, c = g % K4;
    const unsigned keep = d.keep4(m, c, K);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t k = 4 * c + i;
      if (k < K && ((keep >> i) & 1u)) {
        const int64_t e = m * K + k;
        out[e] = from_acc<To>(to_acc<Acc>(out[e]) + to_acc<Acc>(t[e]) * scale);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(bool* __restrict__ out, int64_t M, int64_t K,
                                                                Dropout d) {
  const int64_t K4 = (K + 3) / 4;
  LK_FOR_EACH_GROUP(M * K4, g) {
    const int64_t m = g / K4, c = g % K4;
    const unsigned keep = d.keep4(m, c, K);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (4 * c + i < K) out[m * K + 4 * c + i] = (keep >> i) & 1u;
    }
  }
}

unsigned group_blocks(int64_t M, int64_t K) {
  const int64_t blocks = (M * ((K + 3) / 4) + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));  // grid-stride beyond
}

}  // namespace

cudaError_t launch_dropout(const void* x, void* out, DType dt, int64_t M, int64_t K, Dropout d, bool vec,
                           cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  const int64_t per_block = 128 * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((K + per_block - 1) / per_block), static_cast<unsigned>(M < 65535 ? M : 65535));
  return with_type(dt, [&](auto tag) {
    using T = decltype(tag);
    if (vec) {
      dropout_kernel<T, kVec><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out), M, K, d);
    } else {
      dropout_kernel<T, 1><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out), M, K, d);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_dropout_add(void* out, DType ot, const void* t, DType tt, int64_t M, int64_t K, Dropout d,
                               double scale, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  if (tt != DType::F32 && tt != DType::F64) return cudaErrorInvalidValue;
  const unsigned blocks = group_blocks(M, K);
  const auto run = [&](auto otag) {
    using To = decltype(otag);
    if (tt == DType::F64) {
      dropout_add_kernel<To, double, double>
          <<<blocks, kThreads, 0, stream>>>(static_cast<To*>(out), static_cast<const double*>(t), M, K, d, scale);
    } else if constexpr (std::is_same_v<To, double>) {
      dropout_add_kernel<To, float, double>
          <<<blocks, kThreads, 0, stream>>>(static_cast<To*>(out), static_cast<const float*>(t), M, K, d, scale);
    } else {
      dropout_add_kernel<To, float, float><<<blocks, kThreads, 0, stream>>>(
          static_cast<To*>(out), static_cast<const float*>(t), M, K, d, static_cast<float>(scale));
    }
    return cudaGetLastError();
  };
  switch (ot) {
    case DType::F16: return run(__half{});
    case DType::BF16: return run(__nv_bfloat16{});
    case DType::F32: return run(float{});
    case DType::F64: return run(double{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dropout_mask(bool* out, int64_t M, int64_t K, Dropout d, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  dropout_mask_kernel<<<group_blocks(M, K), kThreads, 0, stream>>>(out, M, K, d);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora_kernels
