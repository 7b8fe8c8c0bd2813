// Seeded dropout mask shared by the C++ (host) and CUDA (device) code, bit-identical to
// lora_kernels/dropout.py (and so to the Triton kernels):
//
//   element (m, k) of an [M, K] activation (logical row-major indices, whatever the strides) is kept iff
//       (bits >> 1) >= threshold,   threshold = min(round_half_even(p · 2^31), 2^31 - 1),
//   where bits is output k % 4 of Philox-4x32-10 (Triton's tl.randint4x) with key (seed lo 32, seed hi 32)
//   and counter (c lo 32, c hi 32, 0, 0), c = m · ceil(K / 4) + k / 4.
//
// One Philox call gives the bits of four neighbouring columns; the kernels' vector paths start at columns
// that are multiples of 4 and make one call per group.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_HOST_DEVICE inline
#define LK_UNROLL
#endif

namespace lora_kernels {

LK_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// The four outputs of Philox-4x32-10 for counter (counter lo, counter hi, 0, 0) and key seed.
LK_HOST_DEVICE void philox4x32(uint64_t seed, uint64_t counter, uint32_t (&out)[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  LK_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c0, 0xD2511F53u, hi_a, lo_a);
    mul_hi_lo(c2, 0xCD9E8D57u, hi_b, lo_b);
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Dropout description passed by value to kernels. active == false means x̂ = x.
struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;   // keep iff (bits >> 1) >= threshold
  float keep_scale = 1.0f;  // 1 / (1 - p)

  // Keep bits (bit t) of the four columns 4g .. 4g + 3 of row m of an [M, K] activation.
  LK_HOST_DEVICE unsigned keep4(uint64_t m, uint64_t g, uint64_t K) const {
    uint32_t bits[4];
    philox4x32(seed, m * ((K + 3) / 4) + g, bits);
    unsigned mask = 0;
    LK_UNROLL
    for (int t = 0; t < 4; ++t) mask |= static_cast<unsigned>((bits[t] >> 1) >= threshold) << t;
    return mask;
  }

  LK_HOST_DEVICE bool keep(uint64_t m, uint64_t k, uint64_t K) const { return (keep4(m, k / 4, K) >> (k % 4)) & 1u; }

  // v[i] := x̂ of element (m, k + i), i < N. With N % 4 == 0, k must be a multiple of 4 (one Philox call per 4).
  template <int N>
  LK_HOST_DEVICE void apply(float (&v)[N], uint64_t m, uint64_t k, uint64_t K) const {
    if (!active) return;
    if constexpr (N % 4 == 0) {
      LK_UNROLL
      for (int g = 0; g < N / 4; ++g) {
        const unsigned mask = keep4(m, k / 4 + g, K);
        LK_UNROLL
        for (int t = 0; t < 4; ++t) v[4 * g + t] = ((mask >> t) & 1u) ? v[4 * g + t] * keep_scale : 0.0f;
      }
    } else {
      LK_UNROLL
      for (int i = 0; i < N; ++i) v[i] = keep(m, k + i, K) ? v[i] * keep_scale : 0.0f;
    }
  }
};

// Same as dropout.keep_threshold: Python's round() is round-half-even, as is nearbyint in the default mode.
inline uint32_t keep_threshold(double p) {
  const double t = std::nearbyint(p * 2147483648.0);
  return t >= 2147483647.0 ? 2147483647u : static_cast<uint32_t>(t);
}

}  // namespace lora_kernels
