// CPU implementations of native_lora_linear_fwd / _bwd and native_dropout, with ATen GEMMs and a C++ dropout
// pass. The math (reference.py):
//     x̂ = x ⊙ m / (1 - p),  S = x̂ Aᵀ,  y = x W0ᵀ + b + s · S Bᵀ
//     dS = s · G B,  dB = s · Gᵀ S,  dA = dSᵀ x̂,  dx = G W0 + (dS A) ⊙ m / (1 - p)
// The LoRA path runs in promote(x, A, float32); y and dx come back in x's dtype, dA / dB in A's / B's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>

#include "ops.h"

namespace lora_kernels {
namespace {

// t := t ⊙ keep / (1 - p) in place, t contiguous and viewed as [numel / K, K] with K = t.size(-1).
void dropout_inplace_cpu(Tensor& t, const Dropout& d, double keep_scale) {
  if (!d.active || t.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  const int64_t K = t.dim() == 0 ? 1 : t.size(-1), M = t.numel() / K, K4 = (K + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p = t.data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(keep_scale);
    // One Philox call per group of four columns (see philox.h).
    at::parallel_for(0, M * K4, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i / K4, g = i % K4;
        const unsigned mask = d.keep4(m, g, K);
        for (int64_t k = 4 * g; k < std::min(4 * g + 4, K); ++k) {
          scalar_t& v = p[m * K + k];
          v = ((mask >> (k - 4 * g)) & 1u) ? static_cast<scalar_t>(static_cast<acc_t>(v) * scale)
                                           : static_cast<scalar_t>(0);
        }
      }
    });
  });
}

// x̂ in dtype `ct` (a fresh contiguous tensor when dropout is active, else possibly x itself).
Tensor x_hat_cpu(const Tensor& x, at::ScalarType ct, const Dropout& d, double dropout_p) {
  if (!d.active) return x.to(ct);
  Tensor out = at::empty(x.sizes(), x.options().dtype(ct));
  out.copy_(x);
  dropout_inplace_cpu(out, d, 1.0 / (1.0 - dropout_p));
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_fwd_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                               const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                               double dropout_p, const OptTensor& seed) {
  check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, /*cuda=*/false);
  const Dropout d = make_dropout(dropout_p, seed);
  const auto ct = lora_compute_dtype(x, lora_A);
  Tensor S = at::matmul(x_hat_cpu(x, ct, d, dropout_p), lora_A.to(ct).t());
  Tensor y = at::linear(x, weight, bias).contiguous();
  y.addmm_(S.mul(scaling).to(y.scalar_type()), lora_B.to(y.scalar_type()).t());
  return {y, S.contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                       const Tensor& lora_A, const Tensor& lora_B, const Tensor& S,
                                                       double scaling, double dropout_p, const OptTensor& seed,
                                                       bool need_dx, bool need_dA, bool need_dB) {
  check_lora_linear_args(x, weight, std::nullopt, lora_A, lora_B, scaling, /*cuda=*/false);
  check_lora_linear_bwd_args(dy, x, weight, lora_A, S);
  const Dropout d = make_dropout(dropout_p, seed);
  const auto ct = lora_compute_dtype(x, lora_A);
  const Tensor G = dy.to(ct);
  Tensor dx = empty_like0(x), dA = empty_like0(lora_A), dB = empty_like0(lora_B);
  if (need_dB) dB = at::matmul(G.t(), S.to(ct)).mul_(scaling).to(lora_B.scalar_type()).contiguous();
  if (need_dA || need_dx) {
    const Tensor dS = at::matmul(G, lora_B.to(ct)).mul_(scaling);  // [M, r]
    if (need_dA) dA = at::matmul(dS.t(), x_hat_cpu(x, ct, d, dropout_p)).to(lora_A.scalar_type()).contiguous();
    if (need_dx) {
      Tensor lora = at::matmul(dS, lora_A.to(ct)).contiguous();  // [M, in]
      dropout_inplace_cpu(lora, d, 1.0 / (1.0 - dropout_p));
      dx = at::matmul(dy, weight).to(ct).add_(lora).to(x.scalar_type()).contiguous();
    }
  }
  return {dx, dA, dB};
}

Tensor dropout_cpu(const Tensor& x, double dropout_p, const Tensor& seed) {
  const Dropout d = make_dropout(dropout_p, seed);
  Tensor out = at::empty(x.sizes(), x.options());
  out.copy_(x);
  dropout_inplace_cpu(out, d, 1.0 / (1.0 - dropout_p));
  return out;
}

}  // namespace lora_kernels
