// CPU kernels for 4-bit (NF4 / FP4) quantized base weights in bitsandbytes' layout (lora_kernels/quant.py):
// codes uint8 [⌈N·K/2⌉], two codes a byte (high nibble first) over the flattened weight W [N, K]; absmax float32
// [⌈N·K/64⌉], one scale per block of 64 consecutive values (blocks cross rows when K % 64 != 0);
//     W[n, k] = fp32(table[code(n·K + k)] · absmax[(n·K + k) / 64])          (bit-exact with bitsandbytes)
//
//   native_quant4_dequantize(codes, absmax, table, N, K) -> W [N, K] float32
//   native_quant4_linear(x [M, K] float32, codes, absmax, table, bias [N]?, N) -> y = x Wᵀ + b [M, N] float32,
//       W never materialised: each row of W is decoded into registers and dotted with every row of x.
//
// Both use AVX-512F when the CPU has it (chosen at run time; the build flags stay generic): the 16-entry table
// sits in one zmm register and a 16-lane permute decodes 16 codes at once; the per-block scale is one multiply,
// so every decoded value is the same float32 as bitsandbytes'. The GEMV reads x split into its even and odd
// columns (high and low nibbles), so no interleave is needed in the inner loop. Everything else (K % 64 != 0,
// no AVX-512) takes a portable loop with the same values.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LK_QUANT_X86 1
#endif

namespace lora_kernels {
namespace {

using at::Tensor;

inline float decode(const uint8_t* codes, const float* absmax, const float* table, int64_t i) {
  const uint8_t b = codes[i >> 1];
  return table[(i & 1) ? (b & 15) : (b >> 4)] * absmax[i >> 6];
}

// ---- portable paths ----

void dequant_range_scalar(const uint8_t* codes, const float* absmax, const float* table, float* out, int64_t i0,
                          int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) out[i] = decode(codes, absmax, table, i);
}

void gemv_rows_scalar(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* absmax,
                      const float* table, float* y, int64_t N, int64_t n0, int64_t n1) {
  std::vector<float> w(K);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < K; ++k) w[k] = decode(codes, absmax, table, n * K + k);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc[16] = {0};  // 16 independent partial sums: vectorisable without reassociating one sum
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += xm[k + l] * w[k + l];
      float s = 0;
      for (; k < K; ++k) s += xm[k] * w[k];
      for (int l = 0; l < 16; ++l) s += acc[l];
      y[m * N + n] = s;
    }
  }
}

// ---- AVX-512F paths ----
#ifdef LK_QUANT_X86
bool has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// 16 codes (8 bytes' worth of high nibbles or low nibbles) decoded and scaled.
__attribute__((target("avx512f"))) inline void decode16x2(const uint8_t* p, __m512 lut, __m512 scale, __m512* hi,
                                                          __m512* lo) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut), scale);
  *lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), lut), scale);
}

// out[64·b0 .. 64·b1) for full blocks b0..b1. `stream`: non-temporal stores (out 64-byte aligned), for an output
// larger than the caches: no read-for-ownership of lines that are only written (measured, 4864 x 896, 1 thread:
// 2.6 -> 1.8 ms min, now below bitsandbytes' own 2.0 in the same run).
template <bool kStream>
__attribute__((target("avx512f"))) void dequant_blocks_avx512(const uint8_t* codes, const float* absmax,
                                                              const float* table, float* out, int64_t b0,
                                                              int64_t b1) {
  const __m512 lut = _mm512_loadu_ps(table);
  const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 s = _mm512_set1_ps(absmax[b]);
    for (int h = 0; h < 2; ++h) {
      __m512 hi, lo;
      decode16x2(codes + b * 32 + h * 16, lut, s, &hi, &lo);
      float* o = out + b * 64 + h * 32;
      if (kStream) {
        _mm512_stream_ps(o, _mm512_permutex2var_ps(hi, even, lo));
        _mm512_stream_ps(o + 16, _mm512_permutex2var_ps(hi, odd, lo));
      } else {
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(hi, even, lo));
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(hi, odd, lo));
      }
    }
  }
  if (kStream) _mm_sfence();
}

// y[m, n] for rows n0..n1 and up to 8 rows of x at once; K % 64 == 0, xe / xo: x's even / odd columns [M, K/2].
__attribute__((target("avx512f"))) void gemv_rows_avx512(const float* xe, const float* xo, int64_t M, int64_t K,
                                                         const uint8_t* codes, const float* absmax,
                                                         const float* table, float* y, int64_t N, int64_t n0,
                                                         int64_t n1) {
  constexpr int MB = 8;
  const __m512 lut = _mm512_loadu_ps(table);
  const int64_t H = K / 2, nblk = K / 64;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * H;
    const float* amax = absmax + n * nblk;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
      __m512 acc[MB];
      for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const __m512 s = _mm512_set1_ps(amax[blk]);
        for (int h = 0; h < 2; ++h) {
          const int64_t off = blk * 32 + h * 16;
          __m512 hi, lo;
          decode16x2(row + off, lut, s, &hi, &lo);
          for (int j = 0; j < mb; ++j) {
            const int64_t xoff = (m0 + j) * H + off;
            acc[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xe + xoff), acc[j]);
            acc[j] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xo + xoff), acc[j]);
          }
        }
      }
      for (int j = 0; j < mb; ++j) y[(m0 + j) * N + n] = _mm512_reduce_add_ps(acc[j]);
    }
  }
}
#endif

constexpr int64_t kStreamMinBytes = 4 << 20;

void check_quant4(const Tensor& codes, const Tensor& absmax, const Tensor& table, int64_t N, int64_t K) {
  TORCH_CHECK(codes.device().is_cpu() && absmax.device().is_cpu() && table.device().is_cpu(),
              "native quant4 ops: tensors must be on the CPU");
  TORCH_CHECK(N >= 1 && K >= 1, "native quant4 ops: N and K must be positive, got ", N, ", ", K);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == (N * K + 1) / 2,
              "codes must be contiguous uint8 with ceil(N*K/2) = ", (N * K + 1) / 2, " elements, got ", codes.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == (N * K + 63) / 64,
              "absmax must be contiguous float32 with ceil(N*K/64) = ", (N * K + 63) / 64, " elements, got ",
              absmax.numel());
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == 16,
              "table must be a contiguous float32 [16] tensor");
}

}  // namespace

Tensor quant4_dequantize_cpu(const Tensor& codes, const Tensor& absmax, const Tensor& table, int64_t N, int64_t K) {
  check_quant4(codes, absmax, table, N, K);
  Tensor out = at::empty({N, K}, codes.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* t = table.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = N * K, full = n / 64;
  // Streaming stores only where the output outgrows a core's L2 (and is 64-byte aligned, as ATen allocates):
  // a small output is read back right away from cache.
  const bool stream = n * 4 > kStreamMinBytes && reinterpret_cast<uintptr_t>(o) % 64 == 0;
  at::parallel_for(0, full, 256, [&](int64_t b0, int64_t b1) {
#ifdef LK_QUANT_X86
    if (has_avx512f()) {
      return stream ? dequant_blocks_avx512<true>(c, a, t, o, b0, b1) : dequant_blocks_avx512<false>(c, a, t, o, b0, b1);
    }
#endif
    dequant_range_scalar(c, a, t, o, b0 * 64, b1 * 64);
  });
  dequant_range_scalar(c, a, t, o, full * 64, n);
  return out;
}

Tensor quant4_linear_cpu(const Tensor& x, const Tensor& codes, const Tensor& absmax, const Tensor& table,
                         const std::optional<Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be a float32 CPU tensor [M, K], got ", x.sizes(), " ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  check_quant4(codes, absmax, table, N, K);
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "bias must be float32 [N]");
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const Tensor xc = x.contiguous();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* t = table.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
#ifdef LK_QUANT_X86
  if (has_avx512f() && K % 64 == 0) {
    const int64_t H = K / 2;
    std::vector<float> xe(M * H), xo(M * H);
    const float* xp = xc.data_ptr<float>();
    for (int64_t i = 0; i < M * H; ++i) {
      xe[i] = xp[2 * i];
      xo[i] = xp[2 * i + 1];
    }
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      gemv_rows_avx512(xe.data(), xo.data(), M, K, c, a, t, yp, N, n0, n1);
    });
  } else
#endif
  {
    const float* xp = xc.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { gemv_rows_scalar(xp, M, K, c, a, t, yp, N, n0, n1); });
  }
  if (bias) y.add_(*bias);
  return y;
}

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def("native_quant4_dequantize(Tensor codes, Tensor absmax, Tensor table, int N, int K) -> Tensor");
  m.def("native_quant4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor table, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("native_quant4_dequantize", &quant4_dequantize_cpu);
  m.impl("native_quant4_linear", &quant4_linear_cpu);
}

// CPU kernels only: on CUDA, qlora_linear runs its "composite" / "triton" backends. A direct call says so rather
// than the dispatcher's generic message (and every native op has a CUDA kernel, as scripts/build_cuda_check.sh
// checks).
namespace {
void quant_cpu_only(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " is not implemented on CUDA in the native backend (CPU only); use "
              "backend=None/'composite'/'triton' for CUDA tensors.");
}
}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  for (const char* name : {"native_quant4_dequantize", "native_quant4_linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&quant_cpu_only>());
  }
}

}  // namespace lora_kernels
