// CPU kernel of native_dora_norm: the [out, r] tail of DoRA's row norm (lora_kernels/ops/dora.py,
// dora_weight_norm) once V = W0 Aᵀ [out, r] and A Aᵀ [r, r] are formed, in one pass over the rows:
//     n2_j = w2_j + extra_j + Σ_q B_jq (2s V_jq + s² Σ_p B_jp AAt_pq)
//     n_j  = −1 where n2_j < cancel · w2_j (the caller recomputes that row directly), else √max(n2_j, 0)
// The PyTorch formulation (addmm into V, vecdot, add, compare, nonzero, clamp, sqrt) is ~6 ops of 15–85 µs each
// at out = 4864, r = 16, 1 thread: ~0.27 ms beside W0 Aᵀ's 1.3 ms; this op is 63–79 µs there (the r² products
// are the work; AVX2 + FMA variant chosen at run time, as the other CPU kernels).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dropout_cpu.h"
#include "ops.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LK_HAVE_AVX2_PATH 1
#endif

namespace lora_kernels {
namespace {

// GCC / clang vector extensions: 32 bytes (8 float or 4 double lanes), one AVX2 register in the avx2 variant, two
// SSE registers in the base one. Plain loops over fixed-size arrays were not kept in registers by GCC: 94 ns a row
// at r = 16 (scalar loads and stores on the stack), against ~10 here.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int W = 32 / sizeof(T);
};

template <typename T>
__attribute__((always_inline)) inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // one unaligned vector load
  return v;
}

constexpr int kRows = 8;  // rows at once: 8 independent multiply-add chains per column chunk (6: 8% slower at r = 16)

// out[i] = B_i · (2s V_i + s² B_i AAt) for NR rows from V, B (row stride r). AAt padded to [r, rp], rp the next
// multiple of the lane count, zeros past r, so every chunk of u = B_i AAt is a full-width register accumulated
// over p; the dot with B_i is vector-wide on full chunks and lane by lane on the last partial one (filling a
// vector lane by lane from memory stalls on store forwarding: 20 ns a row at r = 3).
template <typename T, int NR>
__attribute__((always_inline)) inline void quad_block(const T* V, const T* B, const T* AAtp, int64_t r, int64_t rp,
                                                      T two_s, T s2, T* out) {
  using V_t = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V_t lane[NR];
  T tail[NR];
  for (int i = 0; i < NR; ++i) lane[i] = V_t{}, tail[i] = 0;
  for (int64_t q0 = 0; q0 < r; q0 += W) {
    V_t acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = V_t{};
    for (int64_t p = 0; p < r; ++p) {
      const V_t a = load(AAtp + p * rp + q0);
      for (int i = 0; i < NR; ++i) acc[i] += B[i * r + p] * a;
    }
    const int64_t w = r - q0;
    if (w >= W) {
      for (int i = 0; i < NR; ++i) {
        lane[i] += load(B + i * r + q0) * (two_s * load(V + i * r + q0) + s2 * acc[i]);
      }
    } else {
      for (int i = 0; i < NR; ++i) {
        for (int64_t l = 0; l < w; ++l) {
          tail[i] += B[i * r + q0 + l] * (two_s * V[i * r + q0 + l] + s2 * acc[i][l]);
        }
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    T sum = tail[i];
    for (int l = 0; l < W; ++l) sum += lane[i][l];
    out[i] = sum;
  }
}

template <typename T>
struct NormArgs {
  const T *V, *B, *AAtp, *w2, *extra;  // AAtp: AAt padded to [r, rp]
  T* n;
  int64_t r, rp;
  T s, cancel;
};

template <typename T>
__attribute__((always_inline)) inline void finish(const NormArgs<T>& a, int64_t j, T quad) {
  T n2 = quad + a.w2[j];
  if (a.extra != nullptr) n2 += a.extra[j];
  // NaN compares false on both tests: it reaches the output (a NaN row is never "fixed" into a number).
  a.n[j] = n2 < a.cancel * a.w2[j] ? T(-1) : std::sqrt(n2 < T(0) ? T(0) : n2);
}

template <typename T>
__attribute__((always_inline)) inline void norm_rows_body(const NormArgs<T>& a, int64_t j0, int64_t j1) {
  const int64_t r = a.r, rp = a.rp;
  const T two_s = 2 * a.s, s2 = a.s * a.s;
  T q[kRows];
  int64_t j = j0;
  for (; j + kRows <= j1; j += kRows) {
    quad_block<T, kRows>(a.V + j * r, a.B + j * r, a.AAtp, r, rp, two_s, s2, q);
    for (int i = 0; i < kRows; ++i) finish(a, j + i, q[i]);
  }
  for (; j < j1; ++j) {
    quad_block<T, 1>(a.V + j * r, a.B + j * r, a.AAtp, r, rp, two_s, s2, q);
    finish(a, j, q[0]);
  }
}

template <typename T>
void norm_rows_base(const NormArgs<T>& a, int64_t j0, int64_t j1) { norm_rows_body(a, j0, j1); }

#ifdef LK_HAVE_AVX2_PATH
template <typename T>
__attribute__((target("avx2,fma"))) void norm_rows_avx2(const NormArgs<T>& a, int64_t j0, int64_t j1) {
  norm_rows_body(a, j0, j1);
}
#endif

}  // namespace

void check_dora_norm_args(const Tensor& V, const Tensor& B, const Tensor& AAt, const Tensor& w2,
                          const OptTensor& extra, double scaling, double cancel) {
  TORCH_CHECK(V.dim() == 2, "native_dora_norm: V must have shape [out, r], got ", shape_str(V));
  const int64_t out_f = V.size(0), r = V.size(1);
  TORCH_CHECK(B.dim() == 2 && B.size(0) == out_f && B.size(1) == r, "native_dora_norm: B must have shape [out=",
              out_f, ", r=", r, "] (V's), got ", shape_str(B));
  TORCH_CHECK(AAt.dim() == 2 && AAt.size(0) == r && AAt.size(1) == r, "native_dora_norm: AAt must have shape [r=",
              r, ", r=", r, "], got ", shape_str(AAt));
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == out_f, "native_dora_norm: w2 must have shape [out=", out_f, "], got ",
              shape_str(w2));
  if (extra.has_value()) {
    TORCH_CHECK(extra->dim() == 1 && extra->size(0) == out_f, "native_dora_norm: extra must be None or have "
                "shape [out=", out_f, "], got ", shape_str(*extra));
  }
  const auto dt = V.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "native_dora_norm: V must be float32 or float64, got ", dt);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"B", &B}, {"AAt", &AAt}, {"w2", &w2}}) {
    TORCH_CHECK(t->scalar_type() == dt, "native_dora_norm: ", name, " must have V's dtype ", dt, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == V.device(), "native_dora_norm: ", name, " must be on V's device ", V.device(),
                ", got ", t->device());
  }
  if (extra.has_value()) {
    TORCH_CHECK(extra->scalar_type() == dt && extra->device() == V.device(), "native_dora_norm: extra must have "
                "V's dtype ", dt, " and device ", V.device(), ", got ", extra->scalar_type(), " on ",
                extra->device());
  }
  TORCH_CHECK(std::isfinite(scaling), "native_dora_norm: scaling must be finite, got ", scaling);
  TORCH_CHECK(std::isfinite(cancel) && cancel >= 0, "native_dora_norm: cancel must be finite and >= 0, got ",
              cancel);
}

Tensor dora_norm_cpu(const Tensor& V, const Tensor& B, const Tensor& AAt, const Tensor& w2, const OptTensor& extra,
                     double scaling, double cancel) {
  check_dora_norm_args(V, B, AAt, w2, extra, scaling, cancel);
  TORCH_CHECK(V.device().is_cpu(), "native_dora_norm: the CPU kernel got tensors on ", V.device());
  const int64_t out_f = V.size(0), r = V.size(1);
  const Tensor Vc = V.contiguous(), Bc = B.contiguous(), Ac = AAt.contiguous(), wc = w2.contiguous();
  const Tensor ec = extra.has_value() ? extra->contiguous() : Tensor();
  Tensor n = at::empty({out_f}, V.options());
  if (out_f == 0) return n;
  // ~32k multiply-adds a task: at r = 16 that is ~120 rows, so out = 4864 splits into 40 tasks; a row is r² + r.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, r * r + r));
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "native_dora_norm", [&] {
    const scalar_t* Vp = Vc.data_ptr<scalar_t>();
    const scalar_t* Bp = Bc.data_ptr<scalar_t>();
    // AAt padded to [r, rp] with zeros, rp a multiple of the lane count (quad_block's full-width loads).
    constexpr int64_t W = Vec<scalar_t>::W;
    const int64_t rp = (r + W - 1) / W * W;
    std::vector<scalar_t> AAtp(r * rp, scalar_t(0));
    const scalar_t* Ain = Ac.data_ptr<scalar_t>();
    for (int64_t p = 0; p < r; ++p) std::memcpy(AAtp.data() + p * rp, Ain + p * r, r * sizeof(scalar_t));
    const scalar_t* Ap = AAtp.data();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* ep = ec.defined() ? ec.data_ptr<scalar_t>() : nullptr;
    const NormArgs<scalar_t> a{Vp, Bp, Ap, wp, ep, n.data_ptr<scalar_t>(), r, rp, static_cast<scalar_t>(scaling),
                               static_cast<scalar_t>(cancel)};
    void (*rows)(const NormArgs<scalar_t>&, int64_t, int64_t) = norm_rows_base<scalar_t>;
#ifdef LK_HAVE_AVX2_PATH
    if (cpu_avx2_fma()) rows = norm_rows_avx2<scalar_t>;
#endif
    at::parallel_for(0, out_f, grain, [&](int64_t j0, int64_t j1) { rows(a, j0, j1); });
  });
  return n;
}

}  // namespace lora_kernels
