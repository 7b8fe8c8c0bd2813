// Device helpers shared by the LoRA kernels: dtype conversion, vector loads/stores, warp reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "kernels.h"

namespace lora_kernels {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements at p, as float. N > 1 needs p aligned to N · sizeof(T) (checked by the host).
template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_f32(p[0]);
  } else {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(pk.v[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = from_f32<T>(in[0]);
  } else {
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Calls f(T{}) for the element type of dt.
template <typename F>
cudaError_t with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F32: return f(float{});
    case DType::F64: break;  // not a LoRA kernel dtype
  }
  return cudaErrorInvalidValue;
}

// Calls f(Tx{}, Tw{}) for an activation type and a weight type that is the same or fp32.
template <typename F>
cudaError_t with_types(DType xt, DType wt, F&& f) {
  if (wt != xt && wt != DType::F32) return cudaErrorInvalidValue;
  return with_type(xt, [&](auto xtag) {
    using Tx = decltype(xtag);
    return wt == DType::F32 ? f(Tx{}, float{}) : f(Tx{}, Tx{});
  });
}

}  // namespace cuda
}  // namespace lora_kernels
