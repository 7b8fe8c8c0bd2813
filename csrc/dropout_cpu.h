// CPU dropout passes (and the run-time ISA choice) shared by the CPU ops (csrc/dropout_cpu.cpp has the kernels): the keep-mask of philox.h,
// generated 8 Philox counters (32 columns) at a time with AVX2 when the CPU has it, applied in the same pass
// that reads or updates the data. Every tensor is viewed as [numel / K, K] with K = size(-1), whatever its
// strides, and element (m, k) uses the mask bit of (m, k) of that view.
#pragma once

#include "lora_kernels.h"

namespace lora_kernels {

// x̂ = x ⊙ keep / (1 - p) as a new contiguous tensor of x's shape in `dtype` (x of any strides and float dtype);
// `d` inactive: x converted to `dtype` (a copy). dropout_p must be the p of `d` (its scale in double).
Tensor dropout_to_cpu(const Tensor& x, at::ScalarType dtype, const Dropout& d, double dropout_p);

// out += t ⊙ keep / (1 - p) in one pass, computed in promote(out, t) and rounded once into out (same shape,
// any strides; the mask is the one of t's [numel / K, K] view); `d` inactive: out += t.
void dropout_add_cpu_(const Tensor& out, const Tensor& t, const Dropout& d, double dropout_p);

// Gathered rows, for ops whose rows are tokens picked by index (the multi-adapter segments): row i uses row rows[i]
// of the mask of an [M, K] tensor. x̂ of rows `rows[0 .. n)` of x [M, K] (any strides) as a new contiguous [n, K]
// tensor in `dtype` (d active).
Tensor dropout_rows_to_cpu(const Tensor& x, const int32_t* rows, int64_t n, at::ScalarType dtype, const Dropout& d,
                           double dropout_p);

// out[rows[i]] += t[i] ⊙ keep(row rows[i]) / (1 - p) for i < n, rounded once (out [M, K] any float dtype and
// strides, t [n, K] fp32/fp64; rows distinct; d active).
void dropout_add_rows_cpu_(const Tensor& out, const int32_t* rows, const Tensor& t, const Dropout& d,
                           double dropout_p);

// The instruction set of the mask generator this process picked: "avx2" or "scalar" (the environment variable
// LORA_KERNELS_CPU_ISA=scalar forces the portable one, for tests and comparisons).
const char* dropout_cpu_isa();

// Whether the CPU kernels may run their AVX2 + FMA variants (x86-64 with both, and LORA_KERNELS_CPU_ISA unset or
// not "scalar").
bool cpu_avx2_fma();

}  // namespace lora_kernels
