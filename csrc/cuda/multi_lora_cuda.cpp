// CUDA implementations of the multi-adapter ops (semantics in csrc/multi_lora_cpu.cpp and
// lora_kernels/ops/multi_lora.py). Per-token kernels indexed by token_adapter (BGMV style): a token reads its
// slot's A/B rows directly, so nothing is gathered or sorted and nothing depends on host-side values (no sync,
// CUDA-graph capturable). One shrink launch per slice (into S's column block i), one expand launch per slice
// (into y's columns c_i ..); multi_lora_linear adds the expand to the cuBLAS base GEMM's output in place.
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#include "ops.h"

namespace lora_kernels {
namespace {

cuda::Slots slots_of(const Tensor& token_adapter, const OptTensor& ranks, const OptTensor& scalings) {
  cuda::Slots s;
  s.idx = token_adapter.contiguous();
  if (ranks.has_value()) s.ranks = ranks->contiguous();
  if (scalings.has_value()) s.scalings = scalings->contiguous();
  return s;
}

Tensor shrink_into_new(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter, const OptTensor& ranks,
                       const MultiShape& s) {
  const Tensor S = at::empty({s.T, s.NS * s.R}, x.options().dtype(at::kFloat));
  const Tensor xr = rows_contiguous(x);
  const cuda::Slots slots = slots_of(token_adapter, ranks, std::nullopt);
  for (int64_t i = 0; i < s.NS; ++i) {
    cuda::shrink(xr, rows_contiguous(A_stacks[i]), slots, S.narrow(1, i * s.R, s.R), 1.0, Dropout{});
  }
  return S;
}

// y[:, y_offset ...] += expand; y must have a contiguous last dimension.
void expand_into(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter, const Tensor& y,
                 const Tensor& scalings, const OptTensor& ranks, int64_t y_offset) {
  const int64_t R = B_stacks[0].size(2);
  const Tensor Sr = rows_contiguous(S);
  const cuda::Slots slots = slots_of(token_adapter, ranks, scalings);
  int64_t col = y_offset;
  for (size_t i = 0; i < B_stacks.size(); ++i) {
    const int64_t n = B_stacks[i].size(1);
    cuda::expand(y.narrow(1, col, n), Sr.narrow(1, static_cast<int64_t>(i) * R, R), rows_contiguous(B_stacks[i]),
                 slots, 1.0, Dropout{});
    col += n;
  }
}

}  // namespace

Tensor lora_shrink_cuda(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const OptTensor& ranks) {
  const MultiShape s = check_shrink_args(x, A_stacks, token_adapter, ranks, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  return shrink_into_new(x, A_stacks, token_adapter, ranks, s);
}

void lora_expand_cuda(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor& y,
                      const Tensor& scalings, const OptTensor& ranks, int64_t y_offset) {
  check_expand_args(S, B_stacks, token_adapter, y, scalings, ranks, y_offset, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(y.device());
  if (y.size(0) == 0) return;
  if (y.stride(1) == 1) {
    expand_into(S, B_stacks, token_adapter, y, scalings, ranks, y_offset);
  } else {  // the kernel needs unit column stride: work on a copy of the touched columns
    const int64_t width = check_b_stacks(B_stacks, y.device()).width;
    Tensor view = y.narrow(1, y_offset, width);
    Tensor tmp = view.contiguous();
    expand_into(S, B_stacks, token_adapter, tmp, scalings, ranks, 0);
    view.copy_(tmp);
  }
}

Tensor multi_lora_linear_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks,
                              TensorList B_stacks, const Tensor& scalings, const Tensor& token_adapter,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const OptTensor& ranks, const OptTensor& col_scale) {
  check_multi_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks, /*cuda=*/true);
  const MultiShape s = check_shrink_args(x, A_stacks, token_adapter, ranks, /*cuda=*/true);
  check_col_scale(col_scale, x, A_stacks[0], s.L, weight.size(0), /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xr = rows_contiguous(x);
  const bool scaled = col_scale.has_value();
  Tensor y = at::linear(xr, weight, scaled ? OptTensor() : bias);
  if (y.stride(-1) != 1) y = y.contiguous();
  if (s.T > 0) {
    const Tensor S = shrink_into_new(xr, A_stacks, token_adapter, ranks, s);
    expand_into(S, B_stacks, token_adapter, y, scalings, ranks, 0);
  }
  if (!scaled) return y;
  // The per-slot column scale by ATen ops here (a gather of its rows and a pass over y, y rounded twice): the
  // fused epilogues are the Triton backends' ("triton" / "composite").
  const Tensor key = at::where(token_adapter.ge(0), token_adapter, s.L).to(at::kLong);
  Tensor out = y.to(at::kFloat).mul_(at::index_select(*col_scale, 0, key));
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(y.scalar_type());
}

}  // namespace lora_kernels
