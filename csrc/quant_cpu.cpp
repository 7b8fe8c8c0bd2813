// CPU kernels for 4-bit (NF4 / FP4) quantized base weights in bitsandbytes' layout (lora_kernels/quant.py):
// codes uint8 [⌈N·K/2⌉], two codes a byte (high nibble first) over the flattened weight W [N, K]; absmax float32
// [⌈N·K/64⌉], one scale per block of 64 consecutive values (blocks cross rows when K % 64 != 0);
//     W[n, k] = fp32(table[code(n·K + k)] · absmax[(n·K + k) / 64])          (bit-exact with bitsandbytes)
//
//   native_quant4_dequantize(codes, absmax, table, N, K) -> W [N, K] float32
//   native_quant4_linear(x [M, K] float32, codes, absmax, table, bias [N]?, N, gemv_max_m = 8)
//       -> y = x Wᵀ + b [M, N] float32 (the GEMV up to gemv_max_m rows of x, row blocks + GEMM above)
//   native_quant4_linear_dx(dy [M, N] float32, codes, absmax, table, K) -> dx = dy W [M, K] float32
//   native_quant4_absmax(q_absmax uint8 [nb], nested_absmax float32, nested_code float32 [256],
//                        nested_offset float32 [1], nested_blocksize) -> absmax float32 [nb]
//       absmax[i] = nested_code[q[i]] · nested_absmax[i / nested_blocksize] + offset (rounded after the product
//       and after the sum, as the PyTorch reference: bit-exact).
//
// The linear ops never write a dense W: up to gemv_max_m rows of x each row of W is decoded into registers and
// dotted with every row of x (8 rows of x at a time); above, W is dequantized kBlockBytes at a time (whole rows) into a reused scratch
// block that stays in L2 and the machine's GEMM runs on that block (y[:, rows] = x W[rows]ᵀ, dx += dy[:, rows]
// W[rows]). A fresh [N, K] buffer per call cost its page faults on top of the writes and reads through DRAM.
//
// Both use AVX-512F when the CPU has it (chosen at run time; the build flags stay generic): the 16-entry table
// sits in one zmm register and a 16-lane permute decodes 16 codes at once; the per-block scale is one multiply,
// so every decoded value is the same float32 as bitsandbytes'. The GEMV reads x split into its even and odd
// columns (high and low nibbles), so no interleave is needed in the inner loop. Everything else (K % 64 != 0,
// no AVX-512) takes a portable loop with the same values.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// The AVX-512 paths need x86 and GCC / clang (target attributes, __builtin_cpu_supports); anything else (aarch64,
// MSVC) compiles the portable loops only, with the same values. -DLK_QUANT_PORTABLE builds that on x86 too (how
// the portable structure is compile-checked here).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(LK_QUANT_PORTABLE)
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

// Full blocks b0..b1 into out[0 .. 64·(b1 - b0)). `stream`: non-temporal stores (out 64-byte aligned), for an output
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
      float* o = out + (b - b0) * 64 + h * 32;
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

// 16 codes (8 bytes' worth of high nibbles or low nibbles) decoded, unscaled (the GEMV scales per block).
__attribute__((target("avx512f"))) inline void decode16x2_raw(const uint8_t* p, __m512 lut, __m512* hi, __m512* lo) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
  *lo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), lut);
}

// y[m0 + j, n + r] for NR rows of W0 and MB rows of x (xe / xo: x's even / odd columns [M, K/2], K % 64 == 0).
// Each (r, j) sums a 64-block's products unscaled into part, then acc += absmax · part: one scale per block
// instead of one multiply per decoded code. NR rows at once give NR · MB independent FMA chains: with one chain
// (M = 1, one row) the loop waited on the FMA latency.
template <int NR, int MB>
__attribute__((target("avx512f"))) inline void gemv_tile_avx512(const float* xe, const float* xo, int64_t K,
                                                                const uint8_t* codes, const float* absmax,
                                                                __m512 lut, float* y, int64_t N, int64_t n,
                                                                int64_t m0) {
  const int64_t H = K / 2, nblk = K / 64;
  __m512 acc[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    __m512 part[NR][MB];
    for (int h = 0; h < 2; ++h) {
      const int64_t off = blk * 32 + h * 16;
      __m512 xev[MB], xov[MB];
      for (int j = 0; j < MB; ++j) {
        xev[j] = _mm512_loadu_ps(xe + (m0 + j) * H + off);
        xov[j] = _mm512_loadu_ps(xo + (m0 + j) * H + off);
      }
      for (int r = 0; r < NR; ++r) {
        __m512 hi, lo;
        decode16x2_raw(codes + (n + r) * H + off, lut, &hi, &lo);
        for (int j = 0; j < MB; ++j) {
          part[r][j] = h == 0 ? _mm512_mul_ps(hi, xev[j]) : _mm512_fmadd_ps(hi, xev[j], part[r][j]);
          part[r][j] = _mm512_fmadd_ps(lo, xov[j], part[r][j]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 s = _mm512_set1_ps(absmax[(n + r) * nblk + blk]);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_fmadd_ps(part[r][j], s, acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < MB; ++j) y[(m0 + j) * N + n + r] = _mm512_reduce_add_ps(acc[r][j]);
}

// Rows n0..n1 of y for MB rows of x from m0: NR rows of W0 at a time (measured, 4864 x 896, 1 thread, AMD EPYC
// with AVX-512: M = 1 284 -> 136..151 µs a call at NR = 4 (8: 144..161), M = 2 170 µs at NR = 4 (2: 191); from
// M = 3 the MB chains are enough and the FMAs the bound (M = 4: 342 µs at NR = 2, 308..314 at NR = 1).
template <int MB>
__attribute__((target("avx512f"))) void gemv_rows_mb(const float* xe, const float* xo, int64_t K,
                                                     const uint8_t* codes, const float* absmax, __m512 lut,
                                                     float* y, int64_t N, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NR = MB <= 2 ? 4 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv_tile_avx512<NR, MB>(xe, xo, K, codes, absmax, lut, y, N, n, m0);
  for (; n < n1; ++n) gemv_tile_avx512<1, MB>(xe, xo, K, codes, absmax, lut, y, N, n, m0);
}

// y[m, n] for rows n0..n1 and up to 8 rows of x at once; K % 64 == 0, xe / xo: x's even / odd columns [M, K/2].
__attribute__((target("avx512f"))) void gemv_rows_avx512(const float* xe, const float* xo, int64_t M, int64_t K,
                                                         const uint8_t* codes, const float* absmax,
                                                         const float* table, float* y, int64_t N, int64_t n0,
                                                         int64_t n1) {
  const __m512 lut = _mm512_loadu_ps(table);
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: gemv_rows_mb<1>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 2: gemv_rows_mb<2>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 3: gemv_rows_mb<3>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 4: gemv_rows_mb<4>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 5: gemv_rows_mb<5>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 6: gemv_rows_mb<6>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      case 7: gemv_rows_mb<7>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
      default: gemv_rows_mb<8>(xe, xo, K, codes, absmax, lut, y, N, n0, n1, m0); break;
    }
  }
}
#endif

constexpr int64_t kStreamMinBytes = 4 << 20;

// Flat values [i0, i1) into out[0 .. i1 - i0), on the calling thread: a partial 64-block at either end scalar,
// the full blocks between vectorised (a row block starts mid-block when K % 64 != 0).
void dequant_span(const uint8_t* codes, const float* absmax, const float* table, float* out, int64_t i0, int64_t i1) {
  const int64_t head = std::min(i1, (i0 + 63) / 64 * 64), b0 = head / 64, b1 = std::max(b0, i1 / 64);
  dequant_range_scalar(codes, absmax, table, out - i0, i0, head);
#ifdef LK_QUANT_X86
  if (has_avx512f()) {
    dequant_blocks_avx512<false>(codes, absmax, table, out + (head - i0), b0, b1);
  } else
#endif
  {
    dequant_range_scalar(codes, absmax, table, out - i0, head, b1 * 64);
  }
  dequant_range_scalar(codes, absmax, table, out - i0, std::max(head, b1 * 64), i1);
}

// Rows of W per block of the large-M paths: ~kBlockBytes of float32, so the block the GEMM reads back stays in a
// core's L2 (2 MB here) beside x. Measured at 896 -> 4864, 1 thread, forward min ms at M = 16 / 128 (loaded
// 2-core VM): 256 KB 2.28 / 8.75, 512 KB 2.37 / 8.75, 1 MB 2.00 / 8.62, 2 MB 2.49 / 9.00.
constexpr int64_t kBlockBytes = 1 << 20;

int64_t block_rows(int64_t N, int64_t K) { return std::min(N, std::max<int64_t>(8, kBlockBytes / (4 * K))); }

// One scratch block per thread that runs a block, kept between calls (kBlockBytes = 1 MB, or 8 rows' worth when K
// is larger; so at most 1 MB per thread at K <= 32768): no allocation and no page faults per call; thread_local,
// so concurrent callers never share it.
float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

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

Tensor quant4_dequantize_cpu(const Tensor& codes, const Tensor& absmax, const Tensor& table, int64_t N, int64_t K) {
  check_quant4(codes, absmax, table, N, K);
  Tensor out = at::empty({N, K}, codes.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* t = table.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = N * K, full = n / 64;
  at::parallel_for(0, full, 256, [&](int64_t b0, int64_t b1) {
#ifdef LK_QUANT_X86
    // Streaming stores only where the output outgrows a core's L2 (and is 64-byte aligned, as ATen allocates):
    // a small output is read back right away from cache.
    const bool stream = n * 4 > kStreamMinBytes && reinterpret_cast<uintptr_t>(o) % 64 == 0;
    if (has_avx512f()) {
      return stream ? dequant_blocks_avx512<true>(c, a, t, o + b0 * 64, b0, b1)
                    : dequant_blocks_avx512<false>(c, a, t, o + b0 * 64, b0, b1);
    }
#endif
    dequant_range_scalar(c, a, t, o, b0 * 64, b1 * 64);
  });
  dequant_range_scalar(c, a, t, o, full * 64, n);
  return out;
}

// gemv_max_m: up to this many rows of x the forward decodes W on the fly (every decoded value used M times);
// above, the blocked dequantize + GEMM. Which wins depends on the machine's BLAS, so the caller measures it once
// per process (lora_kernels/ops/qlora.py, gemv_max_m()). Measured, 896 -> 4864, 1 thread, ms (GEMV / blocked):
// Intel Xeon, the GEMV before NR rows at once: M = 8 0.84 / 1.06-1.41, 16 2.70 / 1.93-2.03, 32 4.4 / 2.8-3.0;
// AMD EPYC (MKL's non-Intel code path): M = 8 0.52 / 1.28, 16 ~1.0 / 1.82, 64 ~4.1 / 5.74, 128 ~8.3 / 11.0.

// The large-M paths run one parallel region over the row blocks: each thread dequantizes its blocks into its own
// scratch and runs single-threaded GEMMs on them (BLAS does not thread inside the region), rather than a parallel
// dequantize and a threaded GEMM per block (2 · 17 fork / join barriers per call at 896 -> 4864). One thread runs
// the blocks in order, as a plain loop.

// y = x Wᵀ (into y [M, N], contiguous), one block of rows of W at a time through the scratch block.
void blocked_linear(const Tensor& x, const uint8_t* c, const float* a, const float* t, Tensor& y, int64_t N,
                    int64_t K) {
  const int64_t nb = block_rows(N, K), nblocks = (N + nb - 1) / nb;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    float* buf = scratch(nb * K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nb, rows = std::min(nb, N - n0);
      dequant_span(c, a, t, buf, n0 * K, (n0 + rows) * K);
      const Tensor w = at::from_blob(buf, {rows, K}, x.options());
      Tensor out = y.narrow(1, n0, rows);  // a strided view (ldc = N): the GEMM writes through it
      at::addmm_out(out, out, x, w.t(), /*beta=*/0, /*alpha=*/1);
    }
  });
}

}  // namespace

Tensor quant4_linear_cpu(const Tensor& x, const Tensor& codes, const Tensor& absmax, const Tensor& table,
                         const std::optional<Tensor>& bias, int64_t N, int64_t gemv_max_m) {
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
  TORCH_CHECK(gemv_max_m >= 0, "gemv_max_m must be >= 0, got ", gemv_max_m);
  if (M > gemv_max_m) {
    blocked_linear(xc, c, a, t, y, N, K);
  } else
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

Tensor quant4_linear_dx_cpu(const Tensor& dy, const Tensor& codes, const Tensor& absmax, const Tensor& table,
                            int64_t K) {
  TORCH_CHECK(dy.dim() == 2 && dy.scalar_type() == at::kFloat && dy.device().is_cpu(),
              "dy must be a float32 CPU tensor [M, N], got ", dy.sizes(), " ", dy.scalar_type());
  const int64_t M = dy.size(0), N = dy.size(1);
  check_quant4(codes, absmax, table, N, K);
  if (M == 0) return at::empty({M, K}, dy.options());
  const Tensor g = dy.contiguous();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* t = table.data_ptr<float>();
  const int64_t nb = block_rows(N, K), nblocks = (N + nb - 1) / nb;
  // Each chunk of blocks sums into a partial dx of its own (indexed by its first block: a thread may run several
  // chunks), added up after the region; one thread: one chunk, the partial is dx.
  std::vector<Tensor> parts(nblocks);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    float* buf = scratch(nb * K);
    Tensor acc = at::empty({M, K}, g.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nb, rows = std::min(nb, N - n0);
      dequant_span(c, a, t, buf, n0 * K, (n0 + rows) * K);
      const Tensor w = at::from_blob(buf, {rows, K}, g.options());
      // acc (+)= dy[:, rows] W[rows]: dy's column slice is a strided view (lda = N), no copy
      at::addmm_out(acc, acc, g.narrow(1, n0, rows), w, /*beta=*/b == b0 ? 0 : 1, /*alpha=*/1);
    }
    parts[b0] = acc;
  });
  Tensor dx;
  for (const Tensor& p : parts) {
    if (!p.defined()) continue;
    if (dx.defined()) dx.add_(p); else dx = p;
  }
  return dx;
}

#if defined(__clang__)
#define LK_NO_CONTRACT
#elif defined(__GNUC__)
#define LK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define LK_NO_CONTRACT
#endif

// The product and the sum rounded apart (never an FMA), as the PyTorch reference computes them.
LK_NO_CONTRACT Tensor quant4_absmax_cpu(const Tensor& q, const Tensor& nested_absmax, const Tensor& nested_code,
                                        const Tensor& nested_offset, int64_t nested_blocksize) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  TORCH_CHECK(q.device().is_cpu() && nested_absmax.device().is_cpu() && nested_code.device().is_cpu() &&
              nested_offset.device().is_cpu(), "native_quant4_absmax: tensors must be on the CPU");
  TORCH_CHECK(nested_blocksize >= 1, "nested_blocksize must be positive, got ", nested_blocksize);
  const int64_t nb = q.numel();
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "q_absmax must be contiguous uint8");
  TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat && nested_absmax.is_contiguous() &&
              nested_absmax.numel() == (nb + nested_blocksize - 1) / nested_blocksize,
              "nested_absmax must be contiguous float32 with ceil(", nb, "/", nested_blocksize, ") elements, got ",
              nested_absmax.numel());
  TORCH_CHECK(nested_code.scalar_type() == at::kFloat && nested_code.is_contiguous() && nested_code.numel() == 256,
              "nested_code must be a contiguous float32 [256] tensor");
  TORCH_CHECK(nested_offset.scalar_type() == at::kFloat && nested_offset.numel() == 1,
              "nested_offset must be a one-element float32 tensor");
  Tensor out = at::empty({nb}, nested_absmax.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* a2 = nested_absmax.data_ptr<float>();
  const float* code = nested_code.data_ptr<float>();
  const float off = nested_offset.data_ptr<float>()[0];
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < nb; j += nested_blocksize) {
    const float s = a2[j / nested_blocksize];
    const int64_t e = std::min(nb, j + nested_blocksize);
    for (int64_t i = j; i < e; ++i) {
      const float p = code[qp[i]] * s;
      o[i] = p + off;
    }
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def("native_quant4_dequantize(Tensor codes, Tensor absmax, Tensor table, int N, int K) -> Tensor");
  m.def("native_quant4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor table, Tensor? bias, int N, "
        "int gemv_max_m=8) -> Tensor");
  m.def("native_quant4_linear_dx(Tensor dy, Tensor codes, Tensor absmax, Tensor table, int K) -> Tensor");
  m.def("native_quant4_absmax(Tensor q_absmax, Tensor nested_absmax, Tensor nested_code, Tensor nested_offset, "
        "int nested_blocksize) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("native_quant4_dequantize", &quant4_dequantize_cpu);
  m.impl("native_quant4_linear", &quant4_linear_cpu);
  m.impl("native_quant4_linear_dx", &quant4_linear_dx_cpu);
  m.impl("native_quant4_absmax", &quant4_absmax_cpu);
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
  for (const char* name : {"native_quant4_dequantize", "native_quant4_linear", "native_quant4_linear_dx",
                           "native_quant4_absmax"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&quant_cpu_only>());
  }
}

}  // namespace lora_kernels
