// Multi-adapter ops (lora_kernels/ops/multi_lora.py): the argument checks shared by both devices and the CPU
// implementations. The math:
//     S[t, i·R + j] = x[t] · A_i[l, j]                                  (j < r_l, l = token_adapter[t] >= 0)
//     y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j]     (c_i = y_offset + Σ_{k<i} out_k)
// with r_l = clamp(ranks[l], 0, R). multi_lora_linear with a per-slot column scale col_scale [L + 1, out] (DoRA's
// g; row L for the -1 tokens): y[t] = col_scale[l_t] ⊙ (x[t] W0ᵀ + the expand's term) + b.
//
// The CPU kernels walk the LoRABatch's segments (slot l's tokens are sorted_token_ids[seg_starts[l] ...
// + seg_lens[l]], read on the host and checked against token_adapter): a segment of kGemmMinRows tokens or more
// runs as GEMMs on its rows (gathered into one block unless they already are one, the products added back row by
// row, rounded once); shorter segments (decode: one token per sequence) run per token with plain dot products,
// in parallel, because a BLAS call costs more than their arithmetic.
//
// Training (native_multi_lora_linear_fwd / _bwd, CPU only): per-slot LoRA dropout with the mask regenerated from
// the seed by the vectorised generator of dropout_cpu.cpp as the rows are gathered (never stored); the backward
// runs per segment: GEMMs on the slot's rows of G = dy, S and x̂, dS computed once for dA and dx, in the compute
// dtype, each gradient rounded once into its dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "dropout_cpu.h"
#include "ops.h"

namespace lora_kernels {

namespace {

void check_index_vector(const Tensor& t, const char* name, int64_t n, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kInt, name, " must be an int32 tensor of ",
              "shape [", what, "=", n, "], got ", t.scalar_type(), " ", shape_str(t));
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), ", the inputs on ", dev);
}

void check_act_dtypes(const Tensor& act, const char* act_name, const Tensor& stack, const char* stack_name, bool cuda) {
  TORCH_CHECK(at::isFloatingType(act.scalar_type()), act_name, " must be floating point, got ", act.scalar_type());
  if (!cuda) return;
  const auto dt = act.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "the CUDA kernels support ", act_name,
              " of dtype float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(stack.scalar_type() == dt || stack.scalar_type() == at::kFloat, "the CUDA kernels need ", stack_name,
              " in ", act_name, "'s dtype (", dt, ") or float32, got ", stack.scalar_type());
}

}  // namespace

MultiShape check_shrink_args(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter, const OptTensor& ranks,
                             bool cuda) {
  TORCH_CHECK(x.dim() == 2, "x must have shape [T, in], got ", shape_str(x));
  TORCH_CHECK(!A_stacks.empty(), "A_stacks must be a non-empty list of [L, R, in] tensors");
  const Tensor& A0 = A_stacks[0];
  TORCH_CHECK(A0.dim() == 3 && A0.size(2) == x.size(1) && A0.size(1) >= 1 && A0.size(0) >= 1,
              "A_stacks[0] must have shape [L, R, in=", x.size(1), "] with L, R >= 1, got ", shape_str(A0));
  const int64_t L = A0.size(0), R = A0.size(1);
  for (size_t i = 0; i < A_stacks.size(); ++i) {
    const Tensor& A = A_stacks[i];
    TORCH_CHECK(A.dim() == 3 && A.size(0) == L && A.size(1) == R && A.size(2) == x.size(1), "A_stacks[", i,
                "] must have shape [L=", L, ", R=", R, ", in=", x.size(1), "], got ", shape_str(A));
    TORCH_CHECK(A.scalar_type() == A0.scalar_type(), "all A_stacks must share one dtype, got ", A0.scalar_type(),
                " and ", A.scalar_type());
    TORCH_CHECK(A.device() == x.device(), "A_stacks[", i, "] is on ", A.device(), ", x on ", x.device());
  }
  check_act_dtypes(x, "x", A0, "A_stacks", cuda);
  check_index_vector(token_adapter, "token_adapter", x.size(0), x.device(), "T");
  if (ranks.has_value()) check_index_vector(*ranks, "ranks", L, x.device(), "L");
  return {x.size(0), L, R, static_cast<int64_t>(A_stacks.size())};
}

BShape check_b_stacks(TensorList B_stacks, const at::Device& dev) {
  TORCH_CHECK(!B_stacks.empty(), "B_stacks must be a non-empty list of [L, out, R] tensors");
  const Tensor& B0 = B_stacks[0];
  TORCH_CHECK(B0.dim() == 3 && B0.size(0) >= 1 && B0.size(2) >= 1, "B_stacks[0] must have shape [L, out, R], got ",
              shape_str(B0));
  BShape b{B0.size(0), B0.size(2), 0};
  for (size_t i = 0; i < B_stacks.size(); ++i) {
    const Tensor& B = B_stacks[i];
    TORCH_CHECK(B.dim() == 3 && B.size(0) == b.L && B.size(2) == b.R && B.size(1) >= 1, "B_stacks[", i,
                "] must have shape [L=", b.L, ", out >= 1, R=", b.R, "], got ", shape_str(B));
    TORCH_CHECK(B.scalar_type() == B0.scalar_type(), "all B_stacks must share one dtype, got ", B0.scalar_type(),
                " and ", B.scalar_type());
    TORCH_CHECK(B.device() == dev, "B_stacks[", i, "] is on ", B.device(), ", the inputs on ", dev);
    b.width += B.size(1);
  }
  return b;
}

namespace {
void check_scalings(const Tensor& scalings, int64_t L, const at::Device& dev, bool cuda) {
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == L && at::isFloatingType(scalings.scalar_type()),
              "scalings must be a float tensor of shape [L=", L, "], got ", shape_str(scalings));
  TORCH_CHECK(scalings.device() == dev, "scalings is on ", scalings.device(), ", the inputs on ", dev);
  TORCH_CHECK(!cuda || scalings.scalar_type() == at::kFloat, "the CUDA kernels need scalings in float32, got ",
              scalings.scalar_type());
}
}  // namespace

void check_expand_args(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter, const Tensor& y,
                       const Tensor& scalings, const OptTensor& ranks, int64_t y_offset, bool cuda) {
  TORCH_CHECK(y.dim() == 2, "y must have shape [T, out], got ", shape_str(y));
  const BShape b = check_b_stacks(B_stacks, y.device());
  const int64_t T = y.size(0), NS = static_cast<int64_t>(B_stacks.size());
  TORCH_CHECK(S.dim() == 2 && S.size(0) == T && S.size(1) == NS * b.R, "S must have shape [T=", T, ", NS*R=",
              NS * b.R, "] (NS=", NS, " slices of rank R=", b.R, "), got ", shape_str(S));
  TORCH_CHECK(S.device() == y.device(), "S is on ", S.device(), ", y on ", y.device());
  TORCH_CHECK(at::isFloatingType(S.scalar_type()), "S must be floating point, got ", S.scalar_type());
  TORCH_CHECK(!cuda || S.scalar_type() == at::kFloat, "the CUDA kernels need S in float32, got ", S.scalar_type());
  TORCH_CHECK(y_offset >= 0 && y.size(1) >= y_offset + b.width, "y must have shape [T=", T,
              ", >= y_offset + sum(out)=", y_offset + b.width, "] with y_offset >= 0, got ", shape_str(y),
              " and y_offset=", y_offset);
  check_scalings(scalings, b.L, y.device(), cuda);
  check_act_dtypes(y, "y", B_stacks[0], "B_stacks", cuda);
  check_index_vector(token_adapter, "token_adapter", T, y.device(), "T");
  if (ranks.has_value()) check_index_vector(*ranks, "ranks", b.L, y.device(), "L");
}

void check_multi_linear_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks,
                             TensorList B_stacks, const Tensor& scalings, const Tensor& token_adapter,
                             const OptTensor& ranks, bool cuda) {
  const MultiShape s = check_shrink_args(x, A_stacks, token_adapter, ranks, cuda);
  const BShape b = check_b_stacks(B_stacks, x.device());
  TORCH_CHECK(b.L == s.L && b.R == s.R && static_cast<int64_t>(B_stacks.size()) == s.NS, "B_stacks must be ", s.NS,
              " tensors of shape [L=", s.L, ", out_i, R=", s.R, "] to match A_stacks, got ", B_stacks.size(),
              " of shape ", shape_str(B_stacks[0]));
  TORCH_CHECK(B_stacks[0].scalar_type() == A_stacks[0].scalar_type(), "A_stacks (", A_stacks[0].scalar_type(),
              ") and B_stacks (", B_stacks[0].scalar_type(), ") must share a dtype");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == b.width && weight.size(1) == x.size(1),
              "weight must have shape [out=sum(B out)=", b.width, ", in=", x.size(1), "], got ", shape_str(weight));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), "weight (",
              weight.scalar_type(), ", ", weight.device(), ") must have x's dtype and device (", x.scalar_type(),
              ", ", x.device(), ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.width && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bias must be None or a ", x.scalar_type(), " tensor of shape [out=", b.width, "] on ", x.device(),
                ", got ", shape_str(*bias));
  }
  check_scalings(scalings, s.L, x.device(), cuda);
}

void check_col_scale(const OptTensor& col_scale, const Tensor& x, const Tensor& A0, int64_t L, int64_t out, bool cuda) {
  if (!col_scale.has_value()) return;
  const Tensor& g = *col_scale;
  const auto ct = lora_compute_dtype(x, A0);
  const bool dtype_ok = g.scalar_type() == at::kFloat || (!cuda && g.scalar_type() == ct);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == L + 1 && g.size(1) == out && dtype_ok, "col_scale must be None or a ",
              "tensor of shape [L+1=", L + 1, ", out=", out, "] (row L: the tokens with no adapter) in float32",
              cuda ? "" : " or the LoRA compute dtype", ", got ", g.scalar_type(), " ", shape_str(g));
  TORCH_CHECK(g.device() == x.device(), "col_scale is on ", g.device(), ", the inputs on ", x.device());
}

namespace {

// Segments shorter than this run per token: below it the BLAS calls (and the gather) of the GEMM path cost more
// than the per-token dot products. Measured at in = out = 896, r = 16, T = 32 and 256 with 1, 8 and 32 slots on a
// 2-core AVX2 machine (CPU time per call, 1 thread): 8 beat 2, 4 and 16; per token everywhere loses 3x on prefill.
constexpr int64_t kGemmMinRows = 8;

// One slot's tokens: ids[0 .. n) (rows of x / S / y), all with slot `slot` and rank r >= 1.
struct Segment {
  int64_t slot, r, n;
  const int32_t* ids;
  bool run;  // the ids are consecutive: the rows form one block, nothing to gather
};

struct Segments {
  Tensor ids;  // keeps the host copy of sorted_token_ids alive
  std::vector<Segment> gemm, per_token;
};

// The segments of the batch with tokens and a rank > 0, after checking that they group exactly token_adapter's
// tokens by slot (so a row is written by one segment only: the per-token loop runs in parallel).
Segments segments_of(const Tensor& token_adapter, const Tensor& sorted_token_ids, const Tensor& seg_starts,
                     const Tensor& seg_lens, const OptTensor& ranks, int64_t L, int64_t R) {
  const int64_t T = token_adapter.size(0);
  const at::Device dev = token_adapter.device();
  check_index_vector(sorted_token_ids, "sorted_token_ids", T, dev, "T");
  check_index_vector(seg_starts, "seg_starts", L, dev, "L");
  check_index_vector(seg_lens, "seg_lens", L, dev, "L");
  const Tensor ta = token_adapter.contiguous(), ss = seg_starts.contiguous(), sl = seg_lens.contiguous();
  const int32_t* tap = ta.data_ptr<int32_t>();
  std::vector<int64_t> count(L, 0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(tap[t] >= -1 && tap[t] < L, "token_adapter ids must lie in [-1, num_slots=", L, "), got ", tap[t]);
    if (tap[t] >= 0) ++count[tap[t]];
  }
  Segments out;
  out.ids = sorted_token_ids.contiguous();
  const int32_t* ids = out.ids.data_ptr<int32_t>();
  const int32_t *ssp = ss.data_ptr<int32_t>(), *slp = sl.data_ptr<int32_t>();
  const Tensor rk = ranks.has_value() ? ranks->contiguous() : Tensor();
  const int32_t* rkp = rk.defined() ? rk.data_ptr<int32_t>() : nullptr;
  std::vector<char> seen(T, 0);
  const char* rebuild = " (build the batch with LoRABatch.from_token_adapters)";
  for (int64_t l = 0; l < L; ++l) {
    const int64_t start = ssp[l], n = slp[l];
    TORCH_CHECK(n == count[l] && start >= 0 && start + n <= T, "seg_starts[", l, "]=", start, ", seg_lens[", l,
                "]=", n, " do not cover the ", count[l], " tokens of slot ", l, " in token_adapter", rebuild);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = ids[start + i];
      TORCH_CHECK(t >= 0 && t < T && tap[t] == l && !seen[t], "sorted_token_ids[", start + i, "]=", t,
                  " is not a token of slot ", l, " or appears twice", rebuild);
      seen[t] = 1;
    }
    const int64_t r = rkp != nullptr ? std::clamp<int64_t>(rkp[l], 0, R) : R;
    if (n == 0 || r == 0) continue;
    bool run = true;
    for (int64_t i = 1; i < n && run; ++i) run = ids[start + i] == ids[start] + i;
    (n >= kGemmMinRows ? out.gemm : out.per_token).push_back({l, r, n, ids + start, run});
  }
  return out;
}

// Rows `ids` of x ([T, in]) as one [n, in] block in dtype ct (a view when they already are one).
Tensor rows_of(const Tensor& x, const Segment& g, const Tensor& ids_tensor, at::ScalarType ct) {
  if (g.run) return x.narrow(0, g.ids[0], g.n).to(ct);
  const int64_t offset = g.ids - ids_tensor.data_ptr<int32_t>();
  return at::index_select(x, 0, ids_tensor.narrow(0, offset, g.n)).to(ct);
}

// dst[ids[i], :] (+)= src[i, :] for the rows of a segment; src [n, width] in the compute dtype, dst any float
// dtype and strides. `add`: accumulate in src's dtype and round once into dst.
void scatter_rows(const Tensor& dst, const Segment& g, const Tensor& src, bool add) {
  const int64_t width = src.size(1), ds0 = dst.stride(0), ds1 = dst.stride(1);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_scatter_rows", [&] {
    using acc_t = scalar_t;
    const Tensor s = src.contiguous();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lora_scatter_rows", [&] {
      scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.n, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          scalar_t* row = dp + static_cast<int64_t>(g.ids[i]) * ds0;
          const acc_t* srow = sp + i * width;
          for (int64_t c = 0; c < width; ++c) {
            scalar_t& o = row[c * ds1];
            o = static_cast<scalar_t>(add ? static_cast<acc_t>(o) + srow[c] : srow[c]);
          }
        }
      });
    });
  });
}

// y[ids, :] += alpha · s bᵀ for one segment: s [n, r] and b [out, r] in the compute dtype, y [T, out] any view.
void add_product_rows(const Tensor& y, const Segment& g, const Tensor& s, const Tensor& b, double alpha) {
  if (g.run && y.scalar_type() == s.scalar_type()) {
    y.narrow(0, g.ids[0], g.n).addmm_(s, b.t(), /*beta=*/1, alpha);  // straight into y's block
    return;
  }
  Tensor d = at::empty({g.n, b.size(0)}, s.options());
  at::addmm_out(d, d, s, b.t(), /*beta=*/0, alpha);
  scatter_rows(y, g, d, /*add=*/true);
}

// Σ_k a[k] b[k] with 8 partial sums (vectorised; the order differs from BLAS's only in rounding).
template <typename T>
__attribute__((always_inline)) inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * b[k + i];
  }
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// The row kernel of the per-token path: out[j · os] (+)= scale · Σ_k v[k] · a[j · a_rs + k] for j < rows (rows of
// A against x for the shrink, rows of B against S for the expand). Compiled for baseline x86-64 / the build
// target, and with AVX2 + FMA for the CPUs that have them (chosen at run time, as the dropout generator).
template <typename T>
using DotRowsFn = void (*)(const T* v, const T* a, int64_t a_rs, int64_t rows, int64_t len, T* out, int64_t os,
                           T scale, bool accumulate);

template <typename T>
__attribute__((always_inline)) inline void dot_rows_body(const T* v, const T* a, int64_t a_rs, int64_t rows,
                                                         int64_t len, T* out, int64_t os, T scale, bool accumulate) {
  for (int64_t j = 0; j < rows; ++j) {
    const T s = scale * dot(v, a + j * a_rs, len);
    out[j * os] = accumulate ? out[j * os] + s : s;
  }
}

template <typename T>
void dot_rows_base(const T* v, const T* a, int64_t a_rs, int64_t rows, int64_t len, T* out, int64_t os, T scale,
                   bool accumulate) {
  dot_rows_body(v, a, a_rs, rows, len, out, os, scale, accumulate);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <typename T>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const T* v, const T* a, int64_t a_rs, int64_t rows,
                                                        int64_t len, T* out, int64_t os, T scale, bool accumulate) {
  dot_rows_body(v, a, a_rs, rows, len, out, os, scale, accumulate);
}
#endif

template <typename T>
DotRowsFn<T> dot_rows() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cpu_avx2_fma()) return dot_rows_avx2<T>;
#endif
  return dot_rows_base<T>;
}

// The per-token path needs every operand in the compute dtype with unit inner stride (no per-element casts).
bool per_token_ok(at::ScalarType ct, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (t->scalar_type() != ct || t->stride(-1) != 1) return false;
  }
  return true;
}

// Tokens of the short segments, as (row, segment) pairs, for one parallel loop over all of them.
std::vector<std::pair<int64_t, const Segment*>> tokens_of(const std::vector<Segment>& segs) {
  std::vector<std::pair<int64_t, const Segment*>> out;
  for (const Segment& g : segs) {
    for (int64_t i = 0; i < g.n; ++i) out.emplace_back(g.ids[i], &g);
  }
  return out;
}

// S[t, i·R + j] for the tokens of short segments (all operands in the compute dtype T, unit inner stride).
template <typename T>
void shrink_tokens(const Tensor& x, TensorList A_stacks, const std::vector<Segment>& segs, const Tensor& S) {
  const auto toks = tokens_of(segs);
  const int64_t in_f = x.size(1), R = A_stacks[0].size(1);
  const T* xp = x.const_data_ptr<T>();
  T* sp = S.mutable_data_ptr<T>();
  const DotRowsFn<T> rows = dot_rows<T>();
  at::parallel_for(0, static_cast<int64_t>(toks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const auto [t, g] = toks[q];
      for (size_t i = 0; i < A_stacks.size(); ++i) {
        const Tensor& A = A_stacks[i];
        rows(xp + t * x.stride(0), A.const_data_ptr<T>() + g->slot * A.stride(0), A.stride(1), g->r, in_f,
             sp + t * S.stride(0) + static_cast<int64_t>(i) * R * S.stride(1), S.stride(1), T(1), false);
      }
    }
  });
}

// y[t, c_i + n] += s_l · Σ_j S[t, i·R + j] B_i[l, n, j] for the tokens of short segments (as shrink_tokens).
template <typename T>
void expand_tokens(const Tensor& S, TensorList B_stacks, const std::vector<Segment>& segs, const Tensor& y,
                   const std::vector<double>& scales, int64_t y_offset) {
  const auto toks = tokens_of(segs);
  const int64_t R = B_stacks[0].size(2);
  const T* sp = S.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const DotRowsFn<T> rows = dot_rows<T>();
  at::parallel_for(0, static_cast<int64_t>(toks.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<T> srow(R);
    for (int64_t q = b; q < e; ++q) {
      const auto [t, g] = toks[q];
      const T scale = static_cast<T>(scales[g->slot]);
      int64_t col = y_offset;
      for (size_t i = 0; i < B_stacks.size(); ++i) {
        const Tensor& B = B_stacks[i];
        for (int64_t j = 0; j < g->r; ++j) srow[j] = sp[t * S.stride(0) + (static_cast<int64_t>(i) * R + j) * S.stride(1)];
        const T* bp = B.const_data_ptr<T>() + g->slot * B.stride(0);
        T* yrow = yp + t * y.stride(0) + col * y.stride(1);
        rows(srow.data(), bp, B.stride(1), B.size(1), g->r, yrow, y.stride(1), scale, true);
        col += B.size(1);
      }
    }
  });
}

std::vector<double> scales_of(const Tensor& scalings) {
  const Tensor sc = scalings.to(at::kDouble).contiguous();
  return std::vector<double>(sc.data_ptr<double>(), sc.data_ptr<double>() + sc.numel());
}

// One call's per-slot LoRA dropout: the mask of x viewed as [T, in], row t thresholded with p of t's slot (as
// lora_kernels.dropout; regenerated from the seed wherever it is needed, never stored). No entries without a seed.
struct SlotDropout {
  std::vector<Dropout> d;
  std::vector<double> p;
  bool active(int64_t l) const { return !d.empty() && d[l].active; }
};

SlotDropout slot_dropout(const OptTensor& dropout, const OptTensor& seed, int64_t L) {
  SlotDropout out;
  if (!seed.has_value()) return out;  // dropout is active iff a seed is given
  TORCH_CHECK(dropout.has_value() && dropout->dim() == 1 && dropout->size(0) == L &&
                  at::isFloatingType(dropout->scalar_type()),
              "dropout must be a float tensor of shape [L=", L, "] when seed is given, got ",
              dropout.has_value() ? shape_str(*dropout) : std::string("None"));
  const Tensor p = dropout->to(at::kDouble).cpu().contiguous();
  for (int64_t l = 0; l < L; ++l) {
    const double q = p.data_ptr<double>()[l];
    TORCH_CHECK(q >= 0.0 && q < 1.0, "dropout[", l, "] must be in [0, 1), got ", q);
    out.p.push_back(q);
    out.d.push_back(q > 0.0 ? make_dropout(q, seed) : Dropout{});  // p = 0: the mask keeps everything
  }
  return out;
}

// x̂ rows of segment g as one [n, in] block in dtype ct: masked while gathered when its slot has dropout, else
// rows_of (a view when they already are one block in ct).
Tensor x_hat_rows(const Tensor& x, const Segment& g, const Tensor& ids_tensor, at::ScalarType ct,
                  const SlotDropout& drops) {
  if (!drops.active(g.slot)) return rows_of(x, g, ids_tensor, ct);
  return dropout_rows_to_cpu(x, g.ids, g.n, ct, drops.d[g.slot], drops.p[g.slot]);
}

// S = x̂ Aᵀ [T, NS·R] in ct: the segments' rows up to their ranks, zero elsewhere. The per-token path reads x in
// place, so segments whose slot has dropout take the GEMM path (their rows masked while gathered).
Tensor shrink_segments(const Tensor& x, TensorList A_stacks, const Segments& segs, at::ScalarType ct,
                       const SlotDropout& drops) {
  const int64_t R = A_stacks[0].size(1), NS = static_cast<int64_t>(A_stacks.size());
  Tensor S = at::zeros({x.size(0), NS * R}, x.options().dtype(ct));
  const auto shrink_gemm = [&](const Segment& g) {
    const Tensor xs = x_hat_rows(x, g, segs.ids, ct, drops);
    for (int64_t i = 0; i < NS; ++i) {
      const Tensor part = at::mm(xs, A_stacks[i].select(0, g.slot).narrow(0, 0, g.r).to(ct).t());  // [n, r]
      scatter_rows(S.narrow(1, i * R, g.r), g, part, /*add=*/false);
    }
  };
  for (const Segment& g : segs.gemm) shrink_gemm(g);
  std::vector<Segment> per_token;
  for (const Segment& g : segs.per_token) {
    if (drops.active(g.slot)) {
      shrink_gemm(g);
    } else {
      per_token.push_back(g);
    }
  }
  if (per_token.empty()) return S;
  std::vector<Tensor> A(A_stacks.begin(), A_stacks.end());
  const Tensor xr = rows_contiguous(x);
  if (per_token_ok(ct, {&xr}) && std::all_of(A.begin(), A.end(), [&](const Tensor& a) { return per_token_ok(ct, {&a}); })) {
    AT_DISPATCH_FLOATING_TYPES(ct, "lora_shrink_cpu", [&] { shrink_tokens<scalar_t>(xr, A, per_token, S); });
  } else {  // mixed dtypes: the GEMM path, one segment at a time
    for (const Segment& g : per_token) shrink_gemm(g);
  }
  return S;
}

// y[:, y_offset ...] += the expand of S (any dtypes; S [T, NS·R] read in the compute dtype).
void expand_segments(const Tensor& S, TensorList B_stacks, const Segments& segs, const Tensor& y,
                     const Tensor& scalings, int64_t y_offset) {
  const int64_t R = B_stacks[0].size(2);
  const auto ct = c10::promoteTypes(c10::promoteTypes(S.scalar_type(), B_stacks[0].scalar_type()), at::kFloat);
  const std::vector<double> scales = scales_of(scalings);
  const auto expand_gemm = [&](const Segment& g) {
    const Tensor sg = rows_of(S, g, segs.ids, ct);  // [n, NS·R]
    int64_t col = y_offset;
    for (size_t i = 0; i < B_stacks.size(); ++i) {
      const int64_t n = B_stacks[i].size(1);
      add_product_rows(y.narrow(1, col, n), g, sg.narrow(1, static_cast<int64_t>(i) * R, g.r),
                       B_stacks[i].select(0, g.slot).narrow(1, 0, g.r).to(ct), scales[g.slot]);
      col += n;
    }
  };
  for (const Segment& g : segs.gemm) expand_gemm(g);
  if (segs.per_token.empty()) return;
  std::vector<Tensor> B(B_stacks.begin(), B_stacks.end());
  if (per_token_ok(ct, {&S, &y}) && std::all_of(B.begin(), B.end(), [&](const Tensor& b) { return per_token_ok(ct, {&b}); })) {
    AT_DISPATCH_FLOATING_TYPES(ct, "lora_expand_cpu", [&] {
      expand_tokens<scalar_t>(S, B, segs.per_token, y, scales, y_offset);
    });
  } else {
    for (const Segment& g : segs.per_token) expand_gemm(g);
  }
}

// out[t] = col_scale[l_t] ⊙ yc[t] + b (l_t = L for a -1 token) for yc [T, out] contiguous in the compute dtype,
// computed in that dtype and rounded once into out_dtype (in place when that is yc's dtype): one pass over the
// rows, col_scale's row read in place (no per-token gather).
Tensor scale_rows(const Tensor& yc, const Tensor& col_scale, const Tensor& token_adapter, const OptTensor& bias,
                  at::ScalarType out_dtype) {
  const int64_t T = yc.size(0), N = yc.size(1), L = col_scale.size(0) - 1;
  const Tensor g = col_scale.to(yc.scalar_type()).contiguous();
  const Tensor b = bias.has_value() ? bias->to(yc.scalar_type()).contiguous() : Tensor();
  const Tensor ta = token_adapter.contiguous();
  Tensor out = out_dtype == yc.scalar_type() ? yc : at::empty({T, N}, yc.options().dtype(out_dtype));
  const int32_t* tap = ta.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "multi_lora_col_scale", [&] {
    using acc_t = scalar_t;
    const acc_t* yp = yc.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "multi_lora_col_scale", [&] {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t) {
          const acc_t* gr = gp + (tap[t] >= 0 ? static_cast<int64_t>(tap[t]) : L) * N;
          const acc_t* yr = yp + t * N;
          scalar_t* orow = op + t * N;
          if (bp != nullptr) {
            for (int64_t c = 0; c < N; ++c) orow[c] = static_cast<scalar_t>(yr[c] * gr[c] + bp[c]);
          } else {
            for (int64_t c = 0; c < N; ++c) orow[c] = static_cast<scalar_t>(yr[c] * gr[c]);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

Tensor lora_shrink_cpu(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter,
                       const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens,
                       const Tensor&, const Tensor&, const Tensor&, const OptTensor& ranks) {
  const MultiShape s = check_shrink_args(x, A_stacks, token_adapter, ranks, /*cuda=*/false);
  const Segments segs = segments_of(token_adapter, sorted_token_ids, seg_starts, seg_lens, ranks, s.L, s.R);
  return shrink_segments(x, A_stacks, segs, lora_compute_dtype(x, A_stacks[0]), SlotDropout{});
}

void lora_expand_cpu(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter,
                     const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens, const Tensor&,
                     const Tensor&, const Tensor&, const Tensor& y, const Tensor& scalings, const OptTensor& ranks,
                     int64_t y_offset) {
  check_expand_args(S, B_stacks, token_adapter, y, scalings, ranks, y_offset, /*cuda=*/false);
  const int64_t L = B_stacks[0].size(0), R = B_stacks[0].size(2);
  const Segments segs = segments_of(token_adapter, sorted_token_ids, seg_starts, seg_lens, ranks, L, R);
  expand_segments(S, B_stacks, segs, y, scalings, y_offset);
}

Tensor multi_lora_linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks,
                             TensorList B_stacks, const Tensor& scalings, const Tensor& token_adapter,
                             const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens,
                             const Tensor&, const Tensor&, const Tensor&, const OptTensor& ranks,
                             const OptTensor& col_scale) {
  check_multi_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks, /*cuda=*/false);
  const int64_t L = A_stacks[0].size(0), R = A_stacks[0].size(1), NS = static_cast<int64_t>(A_stacks.size());
  check_col_scale(col_scale, x, A_stacks[0], L, weight.size(0), /*cuda=*/false);
  const auto ct = lora_compute_dtype(x, A_stacks[0]);
  // With col_scale: the base without the bias, in x's dtype as without it, then held in the compute dtype so the
  // LoRA term, the scale and the bias round once into x's dtype (scale_rows, the last pass over the rows).
  const bool scaled = col_scale.has_value();
  Tensor y = at::linear(x, weight, scaled ? OptTensor() : bias);
  if (scaled) y = y.to(ct);
  if (!y.is_contiguous()) y = y.contiguous();
  const auto finish = [&](const Tensor& out) {
    return scaled ? scale_rows(out, *col_scale, token_adapter, bias, x.scalar_type()) : out;
  };
  if (x.size(0) == 0) return finish(y);
  const Segments segs = segments_of(token_adapter, sorted_token_ids, seg_starts, seg_lens, ranks, L, R);
  const std::vector<double> scales = scales_of(scalings);
  // Long segments: gather x's rows once, then per slice the two GEMMs, added into y's rows (no S tensor).
  for (const Segment& g : segs.gemm) {
    const Tensor xs = rows_of(x, g, segs.ids, ct);
    int64_t col = 0;
    for (int64_t i = 0; i < NS; ++i) {
      const int64_t n = B_stacks[i].size(1);
      const Tensor part = at::mm(xs, A_stacks[i].select(0, g.slot).narrow(0, 0, g.r).to(ct).t());  // [n, r]
      add_product_rows(y.narrow(1, col, n), g, part, B_stacks[i].select(0, g.slot).narrow(1, 0, g.r).to(ct),
                       scales[g.slot]);
      col += n;
    }
  }
  if (segs.per_token.empty()) return finish(y);
  // Short segments: per token, through an S of the touched rows only.
  Segments rest;
  rest.ids = segs.ids;
  rest.per_token = segs.per_token;
  expand_segments(shrink_segments(x, A_stacks, rest, ct, SlotDropout{}), B_stacks, rest, y, scalings, 0);
  return finish(y);
}

// ---- training (ops/multi_lora.py's module docstring has the math) ----

std::tuple<Tensor, Tensor> multi_lora_linear_fwd_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks, TensorList B_stacks,
    const Tensor& scalings, const Tensor& token_adapter, const Tensor& sorted_token_ids, const Tensor& seg_starts,
    const Tensor& seg_lens, const Tensor&, const Tensor&, const Tensor&, const OptTensor& ranks,
    const OptTensor& dropout, const OptTensor& seed) {
  check_multi_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks, /*cuda=*/false);
  const int64_t L = A_stacks[0].size(0), R = A_stacks[0].size(1);
  const SlotDropout drops = slot_dropout(dropout, seed, L);
  const Segments segs = segments_of(token_adapter, sorted_token_ids, seg_starts, seg_lens, ranks, L, R);
  // S is kept for the backward, so the forward is the shrink (x̂ masked as its rows are gathered) and the expand
  // of that S into the base GEMM's output.
  Tensor S = shrink_segments(x, A_stacks, segs, lora_compute_dtype(x, A_stacks[0]), drops);
  Tensor y = at::linear(x, weight, bias);
  if (!y.is_contiguous()) y = y.contiguous();
  expand_segments(S, B_stacks, segs, y, scalings, 0);
  return {y, S};
}

namespace {

// dst = alpha · a b computed in a's dtype and rounded once into dst (a block of a gradient stack, any row stride).
void store_product(const Tensor& dst, const Tensor& a, const Tensor& b, double alpha) {
  if (dst.scalar_type() == a.scalar_type()) {
    Tensor out = dst;  // a view: addmm_out writes through it (beta = 0: its contents are never read)
    at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
  } else {
    Tensor p = at::empty({a.size(0), b.size(1)}, a.options());
    dst.copy_(at::addmm_out(p, p, a, b, /*beta=*/0, alpha));
  }
}

struct BwdArgs {
  const Tensor &dy, &x, &S;
  TensorList A_stacks, B_stacks;
  const Segments& segs;
  const SlotDropout& drops;
  const std::vector<double>& scales;
  at::ScalarType ct;
  bool need_dx, need_dA, need_dB;
};

// The backward of one segment (slot l, its n tokens): G = dy rows, per slice i
//     dB_i[l] = s Gᵢᵀ S_i,   dS_i = s Gᵢ B_i[l] (once, for dA and dx),   dA_i[l] = dS_iᵀ x̂,
// and dx rows += (Σ_i dS_i A_i[l]) ⊙ m / (1 - p_l), added in ct and rounded once. Writes only slot l's blocks of
// dA / dB and the segment's rows of dx, so segments can run in parallel.
void bwd_segment(const BwdArgs& a, const Segment& g, const Tensor& dx, std::vector<Tensor>& dA, std::vector<Tensor>& dB) {
  const int64_t l = g.slot, r = g.r, R = a.A_stacks[0].size(1);
  const double s = a.scales[l];
  const Tensor G = rows_of(a.dy, g, a.segs.ids, a.ct);  // [n, Σ out_i]
  const Tensor Sg = a.need_dB ? rows_of(a.S, g, a.segs.ids, a.ct) : Tensor();
  const Tensor xh = a.need_dA ? x_hat_rows(a.x, g, a.segs.ids, a.ct, a.drops) : Tensor();
  // Without dropout, dx's rows in ct and one block: the LoRA term goes straight into them (beta = 1).
  const bool dx_in_place = a.need_dx && g.run && !a.drops.active(l) && dx.scalar_type() == a.ct;
  const Tensor dx_rows = dx_in_place ? dx.narrow(0, g.ids[0], g.n) : Tensor();
  Tensor lora_dx;  // [n, in] in ct otherwise
  int64_t col = 0;
  for (size_t i = 0; i < a.A_stacks.size(); ++i) {
    const Tensor& B = a.B_stacks[i];
    const Tensor Gi = G.narrow(1, col, B.size(1));
    col += B.size(1);
    if (a.need_dB) store_product(dB[i].select(0, l).narrow(1, 0, r), Gi.t(), Sg.narrow(1, i * R, r), s);
    if (!a.need_dA && !a.need_dx) continue;
    Tensor dS = at::empty({g.n, r}, G.options());
    at::addmm_out(dS, dS, Gi, B.select(0, l).narrow(1, 0, r).to(a.ct), /*beta=*/0, s);
    if (a.need_dA) store_product(dA[i].select(0, l).narrow(0, 0, r), dS.t(), xh, 1.0);
    if (a.need_dx) {
      const Tensor Al = a.A_stacks[i].select(0, l).narrow(0, 0, r).to(a.ct);
      if (dx_in_place) {
        dx_rows.addmm_(dS, Al);
      } else if (!lora_dx.defined()) {
        lora_dx = at::mm(dS, Al);
      } else {
        lora_dx.addmm_(dS, Al);
      }
    }
  }
  if (!a.need_dx || dx_in_place) return;
  if (a.drops.active(l)) {
    dropout_add_rows_cpu_(dx, g.ids, lora_dx, a.drops.d[l], a.drops.p[l]);  // masked, added, rounded in one pass
  } else {
    scatter_rows(dx, g, lora_dx, /*add=*/true);
  }
}

}  // namespace

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> multi_lora_linear_bwd_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& weight, TensorList A_stacks, TensorList B_stacks, const Tensor& S,
    const Tensor& scalings, const Tensor& token_adapter, const Tensor& sorted_token_ids, const Tensor& seg_starts,
    const Tensor& seg_lens, const Tensor&, const Tensor&, const Tensor&, const OptTensor& ranks,
    const OptTensor& dropout, const OptTensor& seed, bool need_dx, bool need_dA, bool need_dB) {
  check_multi_linear_args(x, weight, std::nullopt, A_stacks, B_stacks, scalings, token_adapter, ranks, /*cuda=*/false);
  const int64_t T = x.size(0), L = A_stacks[0].size(0), R = A_stacks[0].size(1);
  const int64_t NS = static_cast<int64_t>(A_stacks.size()), out_f = weight.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == T && dy.size(1) == out_f, "dy must have shape [T=", T, ", out=", out_f,
              "], got ", shape_str(dy));
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.device() == x.device(), "dy (", dy.scalar_type(), ", ",
              dy.device(), ") must have x's dtype and device (", x.scalar_type(), ", ", x.device(), ")");
  TORCH_CHECK(S.dim() == 2 && S.size(0) == T && S.size(1) == NS * R && at::isFloatingType(S.scalar_type()),
              "S must be a float tensor of shape [T=", T, ", NS*R=", NS * R, "] (NS=", NS, " slices of rank R=", R,
              "), got ", S.scalar_type(), " ", shape_str(S));
  TORCH_CHECK(S.device() == x.device(), "S is on ", S.device(), ", x on ", x.device());
  const SlotDropout drops = slot_dropout(dropout, seed, L);
  const Segments segs = segments_of(token_adapter, sorted_token_ids, seg_starts, seg_lens, ranks, L, R);
  const std::vector<double> scales = scales_of(scalings);
  // dx starts as the frozen base's G W0 (x's dtype); dA / dB as zeros: slots without tokens, rows / columns past
  // r_l and rank-0 slots get exact zeros.
  const Tensor dx = need_dx ? at::mm(dy, weight) : empty_like0(x);
  std::vector<Tensor> dA, dB;
  for (int64_t i = 0; i < NS; ++i) {
    if (need_dA) dA.push_back(at::zeros(A_stacks[i].sizes(), A_stacks[i].options()));
    if (need_dB) dB.push_back(at::zeros(B_stacks[i].sizes(), B_stacks[i].options()));
  }
  if (!need_dx && !need_dA && !need_dB) return {dx, dA, dB};
  const BwdArgs args{dy, x, S, A_stacks, B_stacks, segs, drops, scales, lora_compute_dtype(x, A_stacks[0]),
                     need_dx, need_dA, need_dB};
  // Long segments one after the other, each GEMM on all threads; short ones (a few tokens each: the BLAS calls'
  // overhead dominates) spread over the threads, which must see the caller's thread-local state (autograd off).
  for (const Segment& g : segs.gemm) bwd_segment(args, g, dx, dA, dB);
  const at::ThreadLocalState tls;
  at::parallel_for(0, static_cast<int64_t>(segs.per_token.size()), 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t q = b; q < e; ++q) bwd_segment(args, segs.per_token[q], dx, dA, dB);
  });
  return {dx, dA, dB};
}

}  // namespace lora_kernels
