// CPU dropout: the keep-mask of philox.h, bit-identical to lora_kernels/dropout.py, and the one-pass ops built on
// it (native_dropout, native_dropout_add_, native_dropout_mask).
//
// The mask costs 10 Philox rounds per 4 columns, which dominated a scalar pass (~6 ns per element, more than
// torch's own bernoulli dropout). With AVX2 a lane runs one Philox counter, so a 256-bit vector makes the bits of
// 32 columns per pass of the rounds (32x32->64 multiplies with _mm256_mul_epu32 on even and odd lanes), and two
// vectors are interleaved to hide the multiply latency. The ISA is chosen at run time (__builtin_cpu_supports):
// the .so is built without -mavx2 and runs on any x86-64; other architectures build the portable loop.
//
// A pass works on chunks of up to kChunk columns of one row: the generator writes the chunk's keep flags
// (~0u / 0) into a small buffer in L1, and a plain loop, which the compiler vectorises, applies them while it
// reads the input. Chunks of all rows are spread over ATen's intra-op threads.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dropout_cpu.h"
#include "ops.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LK_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace lora_kernels {
namespace {

// Columns per chunk: a multiple of 64 (16 Philox groups, one step of the AVX2 generator), 1 KiB of flags.
constexpr int64_t kChunk = 256;

// mask[4 i + t] = ~0u if column t of Philox group `c + i` is kept, else 0, for i < n <= kChunk / 4. May write
// flags up to the next multiple of 16 groups (the buffer holds kChunk).
using KeepFn = void (*)(const Dropout& d, uint64_t c, int64_t n, uint32_t* mask);

void keep_groups_scalar(const Dropout& d, uint64_t c, int64_t n, uint32_t* mask) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits[4];
    philox4x32(d.seed, c + static_cast<uint64_t>(i), bits);
    for (int t = 0; t < 4; ++t) mask[4 * i + t] = (bits[t] >> 1) >= d.threshold ? ~0u : 0u;
  }
}

#ifdef LK_HAVE_AVX2_PATH
// Lane j of a block of 8 counters holds counter base + kLaneOffset[j]: with this order, the 4 x 8 transpose of the
// keep flags below (unpacks within 128-bit halves) comes out in column order without a cross-lane permute.
constexpr uint32_t kLaneOffset[8] = {0, 2, 4, 6, 1, 3, 5, 7};

__attribute__((target("avx2"))) inline void counters8(uint64_t base, __m256i& lo, __m256i& hi) {
  const uint32_t lo0 = static_cast<uint32_t>(base);
  if (lo0 <= 0xFFFFFFFFu - 7u) {  // no carry into the high word inside the block
    lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    hi = _mm256_set1_epi32(static_cast<int>(base >> 32));
    return;
  }
  alignas(32) uint32_t l[8], h[8];
  for (int j = 0; j < 8; ++j) {
    const uint64_t v = base + kLaneOffset[j];
    l[j] = static_cast<uint32_t>(v);
    h[j] = static_cast<uint32_t>(v >> 32);
  }
  lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(l));
  hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
}

// (high, low) 32 bits of x · k per lane; _mm256_mul_epu32 multiplies the even lanes, so the odd ones are shifted down.
__attribute__((target("avx2"))) inline void mul_hi_lo8(__m256i x, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, k), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void keep_groups_avx2(const Dropout& d, uint64_t c, int64_t n, uint32_t* mask) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  // keep iff (bits >> 1) >= threshold, i.e. > threshold - 1 as signed 32-bit (both sides lie in [-1, 2^31)).
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(d.threshold) - 1);
  constexpr int kBlocks = 2;  // independent 8-counter blocks in flight
  for (int64_t i = 0; i < n; i += 8 * kBlocks) {
    __m256i c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
      counters8(c + static_cast<uint64_t>(i + 8 * b), c0[b], c1[b]);
      c2[b] = c3[b] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int b = 0; b < kBlocks; ++b) {
        __m256i hi_a, lo_a, hi_b, lo_b;
        mul_hi_lo8(c0[b], mul_a, hi_a, lo_a);
        mul_hi_lo8(c2[b], mul_b, hi_b, lo_b);
        c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[b]), key0);
        c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[b]), key1);
        c1[b] = lo_b;
        c3[b] = lo_a;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int b = 0; b < kBlocks; ++b) {
      const __m256i f0 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c0[b], 1), thr);
      const __m256i f1 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c1[b], 1), thr);
      const __m256i f2 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c2[b], 1), thr);
      const __m256i f3 = _mm256_cmpgt_epi32(_mm256_srli_epi32(c3[b], 1), thr);
      const __m256i lo01 = _mm256_unpacklo_epi32(f0, f1), lo23 = _mm256_unpacklo_epi32(f2, f3);
      const __m256i hi01 = _mm256_unpackhi_epi32(f0, f1), hi23 = _mm256_unpackhi_epi32(f2, f3);
      __m256i* out = reinterpret_cast<__m256i*>(mask + 4 * (i + 8 * b));
      _mm256_storeu_si256(out + 0, _mm256_unpacklo_epi64(lo01, lo23));  // groups +0, +1
      _mm256_storeu_si256(out + 1, _mm256_unpackhi_epi64(lo01, lo23));  // groups +2, +3
      _mm256_storeu_si256(out + 2, _mm256_unpacklo_epi64(hi01, hi23));  // groups +4, +5
      _mm256_storeu_si256(out + 3, _mm256_unpackhi_epi64(hi01, hi23));  // groups +6, +7
    }
  }
}
#endif  // LK_HAVE_AVX2_PATH

struct Generator {
  KeepFn fn;
  const char* isa;
};

bool force_scalar() {
  const char* env = std::getenv("LORA_KERNELS_CPU_ISA");
  return env != nullptr && std::strcmp(env, "scalar") == 0;
}

const Generator& generator() {
  static const Generator g = [] {
#ifdef LK_HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (!force_scalar() && __builtin_cpu_supports("avx2")) return Generator{keep_groups_avx2, "avx2"};
#endif
    return Generator{keep_groups_scalar, "scalar"};
  }();
  return g;
}

// Element offset of element (m, 0) of t viewed as [numel / K, K], for any strides of the leading dims.
class RowOffsets {
 public:
  explicit RowOffsets(const Tensor& t) {
    for (int64_t d = t.dim() - 2; d >= 0; --d) {  // innermost leading dim first
      if (t.size(d) == 1) continue;
      if (!dims_.empty() && dims_.back().stride * dims_.back().size == t.stride(d)) {
        dims_.back().size *= t.size(d);  // this dim steps over the whole inner one: merge them
      } else {
        dims_.push_back({t.size(d), t.stride(d)});
      }
    }
  }
  int64_t operator()(int64_t m) const {
    int64_t off = 0;
    for (const Dim& d : dims_) {
      off += (m % d.size) * d.stride;
      m /= d.size;
    }
    return off;
  }

 private:
  struct Dim {
    int64_t size, stride;
  };
  std::vector<Dim> dims_;
};

inline int64_t last_dim(const Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }
inline int64_t last_stride(const Tensor& t) { return t.dim() == 0 ? 1 : t.stride(-1); }

struct SameRow {
  int64_t operator()(int64_t m) const { return m; }
};

// f(m, k0, n, mask) for every chunk of up to kChunk columns [k0, k0 + n) of row m of an [M, K] view (M, K > 0),
// mask holding the chunk's keep flags (those of row mask_row(m) of the mask); chunks run in parallel.
template <typename F, typename MaskRow = SameRow>
void for_each_chunk(int64_t M, int64_t K, const Dropout& d, const F& f, const MaskRow& mask_row = MaskRow{}) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const uint64_t groups_per_row = static_cast<uint64_t>((K + 3) / 4);
  const KeepFn keep = generator().fn;
  // ~16K elements per task at least: below that a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::min(K, kChunk));
  at::parallel_for(0, M * chunks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t mask[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / chunks, k0 = (i % chunks) * kChunk, n = std::min(kChunk, K - k0);
      keep(d, static_cast<uint64_t>(mask_row(m)) * groups_per_row + static_cast<uint64_t>(k0 / 4), (n + 3) / 4, mask);
      f(m, k0, n, mask);
    }
  });
}

// The loops below multiply by a per-element factor (scale or 0) rather than select the result: a select of two
// constants is what the compiler turns into vector blends (a conditional result is "control flow" to it). As in
// the torch backend's x · (m / (1 - p)), a dropped inf or NaN gives NaN and a dropped negative gives -0.

// out[k] = x̂ of x[k · xs], k < n.
template <typename To, typename Ti, typename Acc>
inline void store_dropped(To* __restrict__ out, const Ti* __restrict__ x, int64_t xs,
                          const uint32_t* __restrict__ mask, int64_t n, Acc scale) {
  if (xs == 1) {
    for (int64_t k = 0; k < n; ++k) {
      const Acc f = mask[k] ? scale : Acc(0);
      out[k] = static_cast<To>(static_cast<Acc>(x[k]) * f);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const Acc f = mask[k] ? scale : Acc(0);
      out[k] = static_cast<To>(static_cast<Acc>(x[k * xs]) * f);
    }
  }
}

// out[k · os] += t[k · ts] ⊙ keep · scale, k < n, rounded once.
template <typename To, typename Tt, typename Acc>
inline void add_dropped(To* out, int64_t os, const Tt* t, int64_t ts, const uint32_t* mask, int64_t n, Acc scale) {
  if (os == 1 && ts == 1) {
    for (int64_t k = 0; k < n; ++k) {
      const Acc f = mask[k] ? scale : Acc(0);
      out[k] = static_cast<To>(static_cast<Acc>(out[k]) + static_cast<Acc>(t[k]) * f);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const Acc f = mask[k] ? scale : Acc(0);
      To& o = out[k * os];
      o = static_cast<To>(static_cast<Acc>(o) + static_cast<Acc>(t[k * ts]) * f);
    }
  }
}

}  // namespace

const char* dropout_cpu_isa() { return generator().isa; }

bool cpu_avx2_fma() {
  static const bool yes = [] {
#ifdef LK_HAVE_AVX2_PATH
    __builtin_cpu_init();
    return !force_scalar() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return yes;
}

Tensor dropout_to_cpu(const Tensor& x, at::ScalarType dtype, const Dropout& d, double dropout_p) {
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  if (!d.active) return out.copy_(x);
  if (x.numel() == 0) return out;
  const int64_t K = last_dim(x), M = x.numel() / K, xs = last_stride(x);
  const RowOffsets rows(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    using in_t = scalar_t;
    const in_t* xp = x.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lora_dropout_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
      for_each_chunk(M, K, d, [&](int64_t m, int64_t k0, int64_t n, const uint32_t* mask) {
        store_dropped(op + m * K + k0, xp + rows(m) + k0 * xs, xs, mask, n, scale);
      });
    });
  });
  return out;
}

void dropout_add_cpu_(const Tensor& out, const Tensor& t, const Dropout& d, double dropout_p) {
  if (!d.active) {
    out.add_(t);
    return;
  }
  if (t.numel() == 0) return;
  const int64_t K = last_dim(t), M = t.numel() / K, os = last_stride(out), ts = last_stride(t);
  const RowOffsets out_rows(out), t_rows(t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "lora_dropout_add_cpu", [&] {
    using t_t = scalar_t;
    const t_t* tp = t.const_data_ptr<t_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lora_dropout_add_cpu", [&] {
      // promote(out, t): float, or double when either is double.
      using acc_t = std::conditional_t<std::is_same_v<t_t, double> || std::is_same_v<scalar_t, double>, double, float>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
      for_each_chunk(M, K, d, [&](int64_t m, int64_t k0, int64_t n, const uint32_t* mask) {
        add_dropped(op + out_rows(m) + k0 * os, os, tp + t_rows(m) + k0 * ts, ts, mask, n, scale);
      });
    });
  });
}

Tensor dropout_rows_to_cpu(const Tensor& x, const int32_t* rows, int64_t n, at::ScalarType dtype, const Dropout& d,
                           double dropout_p) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && d.active);
  const int64_t K = x.size(1), xs0 = x.stride(0), xs1 = x.stride(1);
  Tensor out = at::empty({n, K}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const auto row = [rows](int64_t m) { return static_cast<int64_t>(rows[m]); };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_rows_cpu", [&] {
    using in_t = scalar_t;
    const in_t* xp = x.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lora_dropout_rows_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
      for_each_chunk(n, K, d, [&](int64_t m, int64_t k0, int64_t c, const uint32_t* mask) {
        store_dropped(op + m * K + k0, xp + row(m) * xs0 + k0 * xs1, xs1, mask, c, scale);
      }, row);
    });
  });
  return out;
}

void dropout_add_rows_cpu_(const Tensor& out, const int32_t* rows, const Tensor& t, const Dropout& d,
                           double dropout_p) {
  TORCH_INTERNAL_ASSERT(out.dim() == 2 && t.dim() == 2 && t.size(1) == out.size(1) && d.active);
  const int64_t n = t.size(0), K = t.size(1);
  if (n == 0 || K == 0) return;
  const int64_t os0 = out.stride(0), os1 = out.stride(1), ts0 = t.stride(0), ts1 = t.stride(1);
  const auto row = [rows](int64_t m) { return static_cast<int64_t>(rows[m]); };
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "lora_dropout_add_rows_cpu", [&] {
    using t_t = scalar_t;
    const t_t* tp = t.const_data_ptr<t_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lora_dropout_add_rows_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<t_t, double> || std::is_same_v<scalar_t, double>, double, float>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
      for_each_chunk(n, K, d, [&](int64_t m, int64_t k0, int64_t c, const uint32_t* mask) {
        add_dropped(op + row(m) * os0 + k0 * os1, os1, tp + m * ts0 + k0 * ts1, ts1, mask, c, scale);
      }, row);
    });
  });
}

// ---- the ops (schemas in csrc/lora_kernels.cpp) ----

Tensor dropout_cpu(const Tensor& x, double dropout_p, const Tensor& seed, std::optional<at::ScalarType> dtype) {
  check_dropout_args(x, dtype);
  return dropout_to_cpu(x, dtype.value_or(x.scalar_type()), make_dropout(dropout_p, seed), dropout_p);
}

void dropout_add_cpu(const Tensor& out, const Tensor& t, double dropout_p, const Tensor& seed) {
  check_dropout_add_args(out, t);
  dropout_add_cpu_(out, t, make_dropout(dropout_p, seed), dropout_p);
}

Tensor dropout_mask_cpu(const Tensor& seed, int64_t M, int64_t K, double dropout_p, std::optional<at::Device> device) {
  TORCH_CHECK(M >= 0 && K >= 0, "dropout_mask: M and K must be >= 0, got M=", M, ", K=", K);
  const Dropout d = make_dropout(dropout_p, seed);
#ifdef LK_WITH_CUDA
  if (device.has_value() && device->is_cuda()) return dropout_mask_cuda(seed, M, K, dropout_p, device);
#endif
  TORCH_CHECK(!device.has_value() || device->is_cpu(), "dropout_mask: device must be cpu",
#ifdef LK_WITH_CUDA
              " or cuda",
#else
              " (lora_kernels._C was built without CUDA)",
#endif
              ", got ", *device);
  Tensor out = at::empty({M, K}, seed.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  bool* op = out.mutable_data_ptr<bool>();
  for_each_chunk(M, K, d, [&](int64_t m, int64_t k0, int64_t n, const uint32_t* mask) {
    bool* o = op + m * K + k0;
    for (int64_t k = 0; k < n; ++k) o[k] = mask[k] != 0;
  });
  return out;
}

}  // namespace lora_kernels
