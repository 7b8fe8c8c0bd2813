// CUDA implementations of native_lora_linear_fwd / _bwd and the dropout ops (same math as the CPU ones in
// csrc/lora_linear_cpu.cpp). The large base GEMMs (x W0ᵀ + b, dy W0) come from ATen (cuBLAS); all the LoRA
// work is in our kernels, with fp32 accumulation and the dropout mask regenerated in-kernel, never stored:
//     forward:  y = linear(x, W0, b);  S = shrink(x̂, A);  y += s · S Bᵀ (expand, in place)
//     backward: dS = s · shrink(dy, Bᵀ);  dB = s · outer(dy, S);  dA = outer(x̂, dS)ᵀ;
//               dx = dy W0;  dx += drop(dS A) (expand with the mask, in place)
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#include "ops.h"

namespace lora_kernels {

std::tuple<Tensor, Tensor> lora_linear_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                                double dropout_p, const OptTensor& seed) {
  check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, /*cuda=*/true);
  const Dropout d = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xr = rows_contiguous(x);
  Tensor y = at::linear(xr, weight, bias);
  if (y.stride(-1) != 1) y = y.contiguous();
  const Tensor S = at::empty({x.size(0), lora_A.size(0)}, x.options().dtype(at::kFloat));
  cuda::shrink(xr, rows_contiguous(lora_A).unsqueeze(0), {}, S, 1.0, d);
  cuda::expand(y, S, rows_contiguous(lora_B).unsqueeze(0), {}, scaling, Dropout{});
  return {y, S};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_bwd_cuda(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                        const Tensor& lora_A, const Tensor& lora_B,
                                                        const Tensor& S, double scaling, double dropout_p,
                                                        const OptTensor& seed, bool need_dx, bool need_dA,
                                                        bool need_dB) {
  check_lora_linear_args(x, weight, std::nullopt, lora_A, lora_B, scaling, /*cuda=*/true);
  check_lora_linear_bwd_args(dy, x, weight, lora_A, S);
  const Dropout d = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), in_f = x.size(1), out_f = weight.size(0), r = lora_A.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor G = rows_contiguous(dy);
  Tensor dx = empty_like0(x), dA = empty_like0(lora_A), dB = empty_like0(lora_B);
  Tensor dS;
  if (need_dx || need_dA) {
    dS = at::empty({M, r}, f32);
    // dS[m, j] = s · Σ_n G[m, n] B[n, j]: a shrink of G against Bᵀ ([r, out], a small copy).
    cuda::shrink(G, lora_B.t().contiguous().unsqueeze(0), {}, dS, scaling, Dropout{});
  }
  if (need_dB) {
    const Tensor acc = at::zeros({out_f, r}, f32);
    cuda::outer_acc(G, rows_contiguous(S.to(at::kFloat)), acc, scaling, Dropout{});
    dB = acc.to(lora_B.scalar_type());
  }
  if (need_dA) {
    const Tensor acc = at::zeros({r, in_f}, f32);
    cuda::outer_acc(rows_contiguous(x), dS, acc.t(), 1.0, d);  // writes acc[j, k] through the [in, r] view
    dA = acc.to(lora_A.scalar_type());
  }
  if (need_dx) {
    dx = at::mm(G, weight);
    if (dx.stride(-1) != 1) dx = dx.contiguous();
    cuda::expand(dx, dS, lora_A.t().contiguous().unsqueeze(0), {}, 1.0, d);
  }
  return {dx, dA, dB};
}

Tensor dropout_cuda(const Tensor& x, double dropout_p, const Tensor& seed, std::optional<at::ScalarType> dtype) {
  check_dropout_args(x, dtype);
  const Dropout d = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = dtype.value_or(x.scalar_type());
  const Tensor xc = x.contiguous().to(dt);  // the kernel reads and writes one dtype, row-major
  Tensor out = at::empty(x.sizes(), x.options().dtype(dt));
  cuda::dropout(xc, out, d);
  return out;
}

void dropout_add_cuda(const Tensor& out, const Tensor& t, double dropout_p, const Tensor& seed) {
  check_dropout_add_args(out, t);
  const Dropout d = make_dropout(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::dropout_add(out, t, d, dropout_p);
}

Tensor dropout_mask_cuda(const Tensor& seed, int64_t M, int64_t K, double dropout_p,
                         std::optional<at::Device> device) {
  TORCH_CHECK(M >= 0 && K >= 0, "dropout_mask: M and K must be >= 0, got M=", M, ", K=", K);
  const Dropout d = make_dropout(dropout_p, seed);
  const at::Device dev = device.has_value() ? *device : at::Device(at::kCUDA, c10::cuda::current_device());
  TORCH_CHECK(dev.is_cuda(), "dropout_mask: device must be a CUDA device here, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  Tensor out = at::empty({M, K}, at::TensorOptions().dtype(at::kBool).device(dev));
  cuda::dropout_mask(out, d);
  return out;
}

}  // namespace lora_kernels
