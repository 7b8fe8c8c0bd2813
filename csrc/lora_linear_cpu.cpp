// CPU implementations of native_lora_linear_fwd / _bwd: ATen GEMMs (the machine's BLAS) around the one-pass
// dropout of csrc/dropout_cpu.cpp. The math (reference.py):
//     x̂ = x ⊙ m / (1 - p),  S = x̂ Aᵀ,  y = x W0ᵀ + b + s · S Bᵀ
//     dS = s · G B,  dB = s · Gᵀ S,  dA = dSᵀ x̂,  dx = G W0 + (dS A) ⊙ m / (1 - p)
// The LoRA path runs in promote(x, A, float32); y and dx come back in x's dtype, dA / dB in A's / B's.
//
// What the LoRA side costs over the frozen layer is the measure here (the base GEMMs are the same BLAS for
// everyone), so: no cast of a tensor already in the compute dtype, `scaling` folded into the GEMMs' alpha, the
// LoRA terms added into the base GEMMs' outputs with addmm_ (beta = 1), x̂ built once per call in one pass, and
// no other temporaries than the [M, r] products and, with dropout, the [M, in] term of dx.
#include <ATen/ops/addmm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>

#include "dropout_cpu.h"
#include "ops.h"

namespace lora_kernels {
namespace {

// t in dtype dt: t itself when it already is (Tensor::to returns self then).
inline Tensor as_type(const Tensor& t, at::ScalarType dt) { return t.to(dt); }

// alpha · a b as a new tensor, alpha applied by the GEMM (beta = 0: the uninitialised output is never read).
Tensor mm_scaled(const Tensor& a, const Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
}

// x̂ in dtype ct: x itself without dropout when x is already ct, else one pass over x.
Tensor x_hat_cpu(const Tensor& x, at::ScalarType ct, const Dropout& d, double dropout_p) {
  return d.active ? dropout_to_cpu(x, ct, d, dropout_p) : as_type(x, ct);
}

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_fwd_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                               const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                               double dropout_p, const OptTensor& seed) {
  check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, /*cuda=*/false);
  const Dropout d = make_dropout(dropout_p, seed);
  const auto ct = lora_compute_dtype(x, lora_A);
  // S = x̂ Aᵀ with A's transpose as a view: BLAS reads A [r, in] row-major as the transposed operand.
  Tensor S = at::mm(x_hat_cpu(x, ct, d, dropout_p), as_type(lora_A, ct).t());
  Tensor y = at::linear(x, weight, bias);
  if (!y.is_contiguous()) y = y.contiguous();
  const auto yt = y.scalar_type();
  // y += s · S Bᵀ in place; in y's dtype (x's) when that is narrower than the compute dtype.
  y.addmm_(as_type(S, yt), as_type(lora_B, yt).t(), /*beta=*/1, scaling);
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                       const Tensor& lora_A, const Tensor& lora_B, const Tensor& S,
                                                       double scaling, double dropout_p, const OptTensor& seed,
                                                       bool need_dx, bool need_dA, bool need_dB) {
  check_lora_linear_args(x, weight, std::nullopt, lora_A, lora_B, scaling, /*cuda=*/false);
  check_lora_linear_bwd_args(dy, x, weight, lora_A, S);
  const Dropout d = make_dropout(dropout_p, seed);
  const auto ct = lora_compute_dtype(x, lora_A);
  const Tensor G = as_type(dy, ct);
  Tensor dx = empty_like0(x), dA = empty_like0(lora_A), dB = empty_like0(lora_B);
  if (need_dB) dB = as_type(mm_scaled(G.t(), as_type(S, ct), scaling), lora_B.scalar_type());  // [out, r]
  if (need_dA || need_dx) {
    const Tensor dS = mm_scaled(G, as_type(lora_B, ct), scaling);  // [M, r]
    if (need_dA) dA = as_type(at::mm(dS.t(), x_hat_cpu(x, ct, d, dropout_p)), lora_A.scalar_type());
    if (need_dx) {
      dx = at::mm(dy, weight);  // x's dtype
      const Tensor A = as_type(lora_A, ct);
      if (d.active) {
        dropout_add_cpu_(dx, at::mm(dS, A), d, dropout_p);  // masked, added and rounded in one pass
      } else if (dx.scalar_type() == ct) {
        dx.addmm_(dS, A);
      } else {
        dx.add_(at::mm(dS, A));  // computed in ct, rounded once into dx
      }
    }
  }
  return {dx, dA, dB};
}

}  // namespace lora_kernels
