// Host-side helpers shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) implementations of the
// lora_kernels::native_* ops: argument checks that name the argument and the expected shape, dtype rules,
// and the dropout description.
#pragma once

// Only the tensor class and the few ATen ops used (not ATen/ATen.h, which costs seconds per file).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string>

#include "philox.h"

namespace lora_kernels {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::string shape_str(const Tensor& t);

// Dtype of the LoRA path: promote(x, lora_A, float32) -- float32, or float64 for float64 inputs.
at::ScalarType lora_compute_dtype(const Tensor& x, const Tensor& lora_A);

// Validates p in [0, 1) and `seed` (None, or a CPU int64 tensor with one element); reads the seed on the host.
Dropout make_dropout(double dropout_p, const OptTensor& seed);

// native_dropout: x floating point; dtype (the output's), when given, floating point.
void check_dropout_args(const Tensor& x, std::optional<at::ScalarType> dtype);

// native_dropout_add_: out (fp16/bf16/fp32/fp64) and t (fp32/fp64) of one shape on one device, out not
// overlapping itself or t partially.
void check_dropout_add_args(const Tensor& out, const Tensor& t);

// x [M, in], weight [out, in], bias [out] | None, lora_A [r, in], lora_B [out, r] on one device, with the
// dtype rules of the Python op. `cuda` adds the dtypes the CUDA kernels support.
void check_lora_linear_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scaling, bool cuda);

// dy [M, out] and S [M, r] for the backward (after check_lora_linear_args).
void check_lora_linear_bwd_args(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                const Tensor& S);

// Empty tensor returned for a gradient that is not needed.
inline Tensor empty_like0(const Tensor& t) { return at::empty({0}, t.options()); }

// Contiguous-rows view: the kernels need stride(-1) == 1 and take any row stride.
inline Tensor rows_contiguous(const Tensor& t) { return t.stride(-1) == 1 || t.numel() == 0 ? t : t.contiguous(); }

}  // namespace lora_kernels
