// Multi-adapter ops (lora_kernels/ops/multi_lora.py): the argument checks shared by both devices and the CPU
// implementations, which group the tokens by slot on the host and run one GEMM per (slot, slice):
//     S[t, i·R + j] = x[t] · A_i[l, j]                                  (j < r_l, l = token_adapter[t] >= 0)
//     y[t, c_i + n] += scalings[l] · Σ_{j<r_l} S[t, i·R + j] · B_i[l, n, j]     (c_i = y_offset + Σ_{k<i} out_k)
// with r_l = clamp(ranks[l], 0, R). The kernels index tokens by token_adapter; the grouped metadata of the
// LoRABatch (sorted_token_ids, seg_*, tile_*) is part of the schema for the Triton backend and is not read.
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>

#include <vector>

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

// The tokens of each slot, from a CPU token_adapter (ids outside [-1, L) raise).
std::vector<std::vector<int64_t>> tokens_by_slot(const Tensor& token_adapter, int64_t L) {
  std::vector<std::vector<int64_t>> out(L);
  const Tensor ta = token_adapter.contiguous();
  const int32_t* p = ta.data_ptr<int32_t>();
  for (int64_t t = 0; t < ta.numel(); ++t) {
    TORCH_CHECK(p[t] >= -1 && p[t] < L, "token_adapter ids must lie in [-1, num_slots=", L, "), got ", p[t]);
    if (p[t] >= 0) out[p[t]].push_back(t);
  }
  return out;
}

std::vector<int64_t> slot_ranks(const OptTensor& ranks, int64_t L, int64_t R) {
  std::vector<int64_t> out(L, R);
  if (!ranks.has_value()) return out;
  const Tensor rk = ranks->contiguous();
  for (int64_t l = 0; l < L; ++l) out[l] = std::clamp<int64_t>(rk.data_ptr<int32_t>()[l], 0, R);
  return out;
}

Tensor long_index(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kLong).clone();
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

Tensor lora_shrink_cpu(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const OptTensor& ranks) {
  const MultiShape s = check_shrink_args(x, A_stacks, token_adapter, ranks, /*cuda=*/false);
  const auto ct = lora_compute_dtype(x, A_stacks[0]);
  Tensor S = at::zeros({s.T, s.NS * s.R}, x.options().dtype(ct));
  const auto groups = tokens_by_slot(token_adapter, s.L);
  const auto rk = slot_ranks(ranks, s.L, s.R);
  for (int64_t l = 0; l < s.L; ++l) {
    if (groups[l].empty() || rk[l] == 0) continue;
    const Tensor toks = long_index(groups[l]);
    const Tensor xs = x.index_select(0, toks).to(ct);
    for (int64_t i = 0; i < s.NS; ++i) {
      const Tensor a = A_stacks[i].select(0, l).narrow(0, 0, rk[l]).to(ct);  // [r_l, in]
      S.narrow(1, i * s.R, rk[l]).index_copy_(0, toks, at::matmul(xs, a.t()));
    }
  }
  return S;
}

void lora_expand_cpu(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor& y,
                     const Tensor& scalings, const OptTensor& ranks, int64_t y_offset) {
  check_expand_args(S, B_stacks, token_adapter, y, scalings, ranks, y_offset, /*cuda=*/false);
  const int64_t L = B_stacks[0].size(0), R = B_stacks[0].size(2);
  const auto ct = c10::promoteTypes(c10::promoteTypes(S.scalar_type(), B_stacks[0].scalar_type()), at::kFloat);
  const auto groups = tokens_by_slot(token_adapter, L);
  const auto rk = slot_ranks(ranks, L, R);
  const Tensor sc = scalings.to(at::kDouble).contiguous();
  for (int64_t l = 0; l < L; ++l) {
    if (groups[l].empty() || rk[l] == 0) continue;
    const Tensor toks = long_index(groups[l]);
    const double scale = sc.data_ptr<double>()[l];
    int64_t col = y_offset;
    for (size_t i = 0; i < B_stacks.size(); ++i) {
      const int64_t n = B_stacks[i].size(1);
      const Tensor s = S.index_select(0, toks).narrow(1, static_cast<int64_t>(i) * R, rk[l]).to(ct).mul(scale);
      const Tensor b = B_stacks[i].select(0, l).narrow(1, 0, rk[l]).to(ct);  // [n, r_l]
      Tensor view = y.narrow(1, col, n);
      // Add in the compute dtype and round once, as the CUDA kernel does.
      view.index_copy_(0, toks, view.index_select(0, toks).to(ct).add_(at::matmul(s, b.t())).to(y.scalar_type()));
      col += n;
    }
  }
}

Tensor multi_lora_linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks,
                             TensorList B_stacks, const Tensor& scalings, const Tensor& token_adapter,
                             const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens,
                             const Tensor& tile_slot, const Tensor& tile_start, const Tensor& tile_end,
                             const OptTensor& ranks) {
  check_multi_linear_args(x, weight, bias, A_stacks, B_stacks, scalings, token_adapter, ranks, /*cuda=*/false);
  Tensor y = at::linear(x, weight, bias).contiguous();
  if (x.size(0) == 0) return y;
  const Tensor S = lora_shrink_cpu(x, A_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot,
                                   tile_start, tile_end, ranks);
  lora_expand_cpu(S, B_stacks, token_adapter, sorted_token_ids, seg_starts, seg_lens, tile_slot, tile_start,
                  tile_end, y, scalings, ranks, 0);
  return y;
}

}  // namespace lora_kernels
