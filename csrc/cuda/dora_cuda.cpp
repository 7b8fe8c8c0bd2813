// CUDA kernel of native_dora_norm (semantics in csrc/dora_cpu.cpp), in ATen ops. The Python layer does not call
// it: on CUDA, dora_weight_norm runs its PyTorch tail and kernels/dora.py's fix-up kernel (no host read); this
// exists so the op has a CUDA kernel with the same results for a direct call.
#include <ATen/ops/addmm.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace lora_kernels {

Tensor dora_norm_cuda(const Tensor& V, const Tensor& B, const Tensor& AAt, const Tensor& w2, const OptTensor& extra,
                      double scaling, double cancel) {
  check_dora_norm_args(V, B, AAt, w2, extra, scaling, cancel);
  const c10::cuda::CUDAGuard guard(V.device());
  // U = 2s V + s² B AAt (one addmm, as the PyTorch path); n2 = w2 + extra + Σ_q B ⊙ U.
  Tensor n2 = at::addmm(V, B, AAt, /*beta=*/2.0 * scaling, /*alpha=*/scaling * scaling).mul_(B).sum(1).add_(w2);
  if (extra.has_value()) n2.add_(*extra);
  const Tensor cancels = n2.lt(w2.mul(cancel));
  return at::where(cancels, at::full_like(n2, -1.0), n2.clamp_min(0).sqrt_());
}

}  // namespace lora_kernels
