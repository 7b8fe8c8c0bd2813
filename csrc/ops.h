// The kernels behind each lora_kernels::native_* op, per device; registered in csrc/lora_kernels.cpp (the one
// file that includes torch/library.h). Schemas and semantics: lora_kernels.cpp and lora_kernels/ops/native.py.
#pragma once

#include <tuple>
#include <vector>

#include "lora_kernels.h"

namespace lora_kernels {

using at::TensorList;

#define LK_DECLARE_OPS(dev)                                                                                       \
  std::tuple<Tensor, Tensor> lora_linear_fwd_##dev(const Tensor& x, const Tensor& weight, const OptTensor& bias,  \
                                                   const Tensor& lora_A, const Tensor& lora_B, double scaling,   \
                                                   double dropout_p, const OptTensor& seed);                     \
  std::tuple<Tensor, Tensor, Tensor> lora_linear_bwd_##dev(                                                      \
      const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,       \
      const Tensor& S, double scaling, double dropout_p, const OptTensor& seed, bool need_dx, bool need_dA,      \
      bool need_dB);                                                                                             \
  Tensor dropout_##dev(const Tensor& x, double dropout_p, const Tensor& seed, std::optional<at::ScalarType> dtype); \
  void dropout_add_##dev(const Tensor& out, const Tensor& t, double dropout_p, const Tensor& seed);              \
  Tensor dropout_mask_##dev(const Tensor& seed, int64_t M, int64_t K, double dropout_p,                          \
                            std::optional<at::Device> device);                                                   \
  Tensor lora_shrink_##dev(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter,                    \
                           const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens,     \
                           const Tensor& tile_slot, const Tensor& tile_start, const Tensor& tile_end,            \
                           const OptTensor& ranks);                                                              \
  void lora_expand_##dev(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter,                      \
                         const Tensor& sorted_token_ids, const Tensor& seg_starts, const Tensor& seg_lens,       \
                         const Tensor& tile_slot, const Tensor& tile_start, const Tensor& tile_end,              \
                         const Tensor& y, const Tensor& scalings, const OptTensor& ranks, int64_t y_offset);     \
  Tensor multi_lora_linear_##dev(const Tensor& x, const Tensor& weight, const OptTensor& bias,                   \
                                 TensorList A_stacks, TensorList B_stacks, const Tensor& scalings,               \
                                 const Tensor& token_adapter, const Tensor& sorted_token_ids,                    \
                                 const Tensor& seg_starts, const Tensor& seg_lens, const Tensor& tile_slot,      \
                                 const Tensor& tile_start, const Tensor& tile_end, const OptTensor& ranks,        \
                                 const OptTensor& col_scale);                                                    \
  Tensor dora_norm_##dev(const Tensor& V, const Tensor& B, const Tensor& AAt, const Tensor& w2,                 \
                         const OptTensor& extra, double scaling, double cancel);

LK_DECLARE_OPS(cpu)

// Multi-adapter training, CPU only (the CUDA key of these ops raises; the Python layer runs other code on CUDA).
std::tuple<Tensor, Tensor> multi_lora_linear_fwd_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks, TensorList B_stacks,
    const Tensor& scalings, const Tensor& token_adapter, const Tensor& sorted_token_ids, const Tensor& seg_starts,
    const Tensor& seg_lens, const Tensor& tile_slot, const Tensor& tile_start, const Tensor& tile_end,
    const OptTensor& ranks, const OptTensor& dropout, const OptTensor& seed);
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> multi_lora_linear_bwd_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& weight, TensorList A_stacks, TensorList B_stacks, const Tensor& S,
    const Tensor& scalings, const Tensor& token_adapter, const Tensor& sorted_token_ids, const Tensor& seg_starts,
    const Tensor& seg_lens, const Tensor& tile_slot, const Tensor& tile_start, const Tensor& tile_end,
    const OptTensor& ranks, const OptTensor& dropout, const OptTensor& seed, bool need_dx, bool need_dA,
    bool need_dB);
#ifdef LK_WITH_CUDA
LK_DECLARE_OPS(cuda)
#endif
#undef LK_DECLARE_OPS

// native_dora_norm: V [out, r], B [out, r], AAt [r, r], w2 [out], extra [out] | None, one float dtype (float32 or
// float64) on one device; scaling finite, cancel finite and >= 0. Shared by both devices (csrc/dora_cpu.cpp).
void check_dora_norm_args(const Tensor& V, const Tensor& B, const Tensor& AAt, const Tensor& w2,
                          const OptTensor& extra, double scaling, double cancel);

// ---- multi-adapter argument checks (shared by both devices) ----

// T, L, R and NS (slices) after checking x [T, in], the A stacks ([L, R, in] each, one dtype), token_adapter
// ([T] int32) and ranks ([L] int32 or None). `cuda` adds the dtypes the CUDA kernels support.
struct MultiShape {
  int64_t T, L, R, NS;
};
MultiShape check_shrink_args(const Tensor& x, TensorList A_stacks, const Tensor& token_adapter, const OptTensor& ranks,
                             bool cuda);

// L, R and Σ out_i of the B stacks ([L, out_i, R] each, one dtype, on `dev`).
struct BShape {
  int64_t L, R, width;
};
BShape check_b_stacks(TensorList B_stacks, const at::Device& dev);

// S [T, NS·R], the B stacks, token_adapter, y [T, >= y_offset + Σ out_i], scalings [L] and ranks.
void check_expand_args(const Tensor& S, TensorList B_stacks, const Tensor& token_adapter, const Tensor& y,
                       const Tensor& scalings, const OptTensor& ranks, int64_t y_offset, bool cuda);

// x, weight [Σ out_i, in], bias, matching A/B stacks, scalings, token_adapter and ranks of multi_lora_linear.
void check_multi_linear_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, TensorList A_stacks,
                             TensorList B_stacks, const Tensor& scalings, const Tensor& token_adapter,
                             const OptTensor& ranks, bool cuda);

// multi_lora_linear's optional per-slot column scale: [L + 1, out] on x's device, float32 (or, on CPU, the LoRA
// compute dtype of x and the A stacks).
void check_col_scale(const OptTensor& col_scale, const Tensor& x, const Tensor& A0, int64_t L, int64_t out, bool cuda);

}  // namespace lora_kernels
