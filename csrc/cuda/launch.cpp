// Host wrappers of the CUDA kernels: take ATen tensors, check layouts, choose the vector path and the split
// sizes, and enqueue on the current stream (csrc/cuda/kernels.h has the ATen-free kernel interface).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cuda/kernels.h"
#include "cuda/launch.h"

namespace lora_kernels {
namespace cuda {
namespace {

DType dtype_of(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    default: TORCH_CHECK(false, what, ": the CUDA kernels support float16, bfloat16 and float32, got ", t.scalar_type());
  }
}

// The standalone dropout ops also take float64.
DType any_dtype_of(const Tensor& t, const char* what) {
  return t.scalar_type() == at::kDouble ? DType::F64 : dtype_of(t, what);
}

// Vectors of kVec elements can start at every row of t: aligned base, row strides and last dim multiples of kVec.
bool vec_ok(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (kVec * t.element_size()) != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % kVec != 0) return false;
  }
  return t.stride(-1) == 1 && t.size(-1) % kVec == 0;
}

int sm_count() {
  static int cache[256] = {0};
  const int dev = c10::cuda::current_device();
  if (cache[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev));
  return cache[dev];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
const T* opt_ptr(const OptTensor& t, at::ScalarType dt, int64_t n) {
  if (!t.has_value()) return nullptr;
  TORCH_INTERNAL_ASSERT(t->scalar_type() == dt && t->is_contiguous() && t->numel() == n && t->is_cuda());
  return t->data_ptr<T>();
}

constexpr int64_t kMaxGridX = 2147483647LL, kMaxGridYZ = 65535;

}  // namespace

void shrink(const Tensor& x, const Tensor& W, const Slots& slots, const Tensor& out, double scale, const Dropout& d) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && W.dim() == 3 && out.dim() == 2);
  ShrinkArgs a{};
  a.M = x.size(0), a.K = x.size(1), a.L = W.size(0), a.R = W.size(1);
  TORCH_INTERNAL_ASSERT(W.size(2) == a.K && out.size(0) == a.M && out.size(1) == a.R);
  TORCH_INTERNAL_ASSERT(x.stride(1) == 1 && W.stride(2) == 1 && out.stride(1) == 1 && out.scalar_type() == at::kFloat);
  TORCH_CHECK(a.M <= kMaxGridX, "lora shrink: ", a.M, " rows are too many for one launch");
  TORCH_CHECK(a.R <= kShrinkMaxRank, "lora shrink: rank ", a.R, " is larger than the supported ", kShrinkMaxRank);
  if (a.M == 0 || a.R == 0) return;
  if (a.K == 0) {
    out.zero_();
    return;
  }
  a.x = x.data_ptr(), a.x_rs = x.stride(0), a.xt = dtype_of(x, "x");
  a.w = W.data_ptr(), a.w_ls = W.stride(0), a.w_rs = W.stride(1), a.wt = dtype_of(W, "lora weights");
  a.idx = opt_ptr<int32_t>(slots.idx, at::kInt, a.M);
  a.ranks = opt_ptr<int32_t>(slots.ranks, at::kInt, a.L);
  a.out = out.data_ptr<float>(), a.out_rs = out.stride(0);
  a.scale = static_cast<float>(scale), a.d = d;
  a.vec = vec_ok(x) && vec_ok(W);
  // One block per row: split K until the grid covers the GPU about twice, keeping chunks of >= 2 split steps
  // (two vector loads per lane per rank).
  const int64_t step = kShrinkSplitStep;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  int64_t splits = 1;
  if (a.M < target) {
    splits = std::clamp<int64_t>(ceil_div(target, a.M), 1, std::clamp<int64_t>(a.K / (2 * step), 1, kMaxGridYZ));
  }
  a.k_chunk = ceil_div(ceil_div(a.K, splits), step) * step;
  a.splits = ceil_div(a.K, a.k_chunk);
  if (a.splits > 1) out.zero_();
  C10_CUDA_CHECK(launch_shrink(a, c10::cuda::getCurrentCUDAStream()));
}

void expand(const Tensor& y, const Tensor& S, const Tensor& W, const Slots& slots, double scale, const Dropout& d) {
  TORCH_INTERNAL_ASSERT(y.dim() == 2 && S.dim() == 2 && W.dim() == 3);
  ExpandArgs a{};
  a.M = y.size(0), a.N = y.size(1), a.L = W.size(0), a.R = W.size(2);
  TORCH_INTERNAL_ASSERT(S.size(0) == a.M && S.size(1) == a.R && W.size(1) == a.N);
  TORCH_INTERNAL_ASSERT(y.stride(1) == 1 && S.stride(1) == 1 && W.stride(2) == 1 && S.scalar_type() == at::kFloat);
  TORCH_CHECK(a.R <= kExpandMaxRank, "lora expand: rank ", a.R, " is larger than the supported ", kExpandMaxRank);
  if (a.M == 0 || a.N == 0 || a.R == 0) return;
  a.y = y.data_ptr(), a.y_rs = y.stride(0), a.yt = dtype_of(y, "y");
  a.S = S.data_ptr<float>(), a.s_rs = S.stride(0);
  a.w = W.data_ptr(), a.w_ls = W.stride(0), a.w_ns = W.stride(1), a.wt = dtype_of(W, "lora weights");
  a.idx = opt_ptr<int32_t>(slots.idx, at::kInt, a.M);
  a.ranks = opt_ptr<int32_t>(slots.ranks, at::kInt, a.L);
  a.scalings = opt_ptr<float>(slots.scalings, at::kFloat, a.L);
  a.scale = static_cast<float>(scale), a.d = d;
  a.vec_y = vec_ok(y), a.vec_w = vec_ok(W);
  TORCH_CHECK(a.M <= kMaxGridX && ceil_div(a.N, kExpandThreads * (a.vec_y ? kVec : 1)) <= kMaxGridYZ,
              "lora expand: [", a.M, ", ", a.N, "] output is too large");
  C10_CUDA_CHECK(launch_expand(a, c10::cuda::getCurrentCUDAStream()));
}

void outer_acc(const Tensor& X, const Tensor& Z, const Tensor& out, double scale, const Dropout& d) {
  TORCH_INTERNAL_ASSERT(X.dim() == 2 && Z.dim() == 2 && out.dim() == 2);
  OuterArgs a{};
  a.M = X.size(0), a.N = X.size(1), a.R = Z.size(1);
  TORCH_INTERNAL_ASSERT(Z.size(0) == a.M && out.size(0) == a.N && out.size(1) == a.R);
  TORCH_INTERNAL_ASSERT(X.stride(1) == 1 && Z.stride(1) == 1 && out.scalar_type() == at::kFloat &&
                        Z.scalar_type() == at::kFloat);
  if (a.M == 0 || a.N == 0 || a.R == 0) return;
  a.x = X.data_ptr(), a.x_rs = X.stride(0), a.xt = dtype_of(X, "x");
  a.z = Z.data_ptr<float>(), a.z_rs = Z.stride(0);
  a.out = out.data_ptr<float>(), a.out_ns = out.stride(0), a.out_js = out.stride(1);
  a.scale = static_cast<float>(scale), a.d = d;
  a.vec = vec_ok(X);
  const int64_t gx = ceil_div(a.N, kOuterThreads * (a.vec ? kVec : 1)), gy = ceil_div(a.R, kOuterRanks);
  TORCH_CHECK(gx <= kMaxGridX && gy <= kMaxGridYZ, "lora outer: [", a.N, ", ", a.R, "] output is too large");
  // Split M until the grid covers the GPU about four times, keeping >= 16 rows per split.
  int64_t splits = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(sm_count()), gx * gy));
  splits = std::min({splits, ceil_div(a.M, 16), kMaxGridYZ});
  a.m_chunk = ceil_div(a.M, splits);
  a.splits = ceil_div(a.M, a.m_chunk);
  C10_CUDA_CHECK(launch_outer(a, c10::cuda::getCurrentCUDAStream()));
}

void dropout(const Tensor& x, const Tensor& out, const Dropout& d) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && out.is_contiguous() && x.scalar_type() == out.scalar_type());
  if (x.numel() == 0) return;
  const Tensor x2 = x.view({-1, x.dim() == 0 ? 1 : x.size(-1)}), o2 = out.view({-1, x2.size(1)});
  const int64_t M = x2.size(0), K = x2.size(1);
  TORCH_CHECK(ceil_div(K, 128) <= kMaxGridX, "lora dropout: rows of ", K, " elements are too long");
  C10_CUDA_CHECK(launch_dropout(x2.data_ptr(), o2.data_ptr(), dtype_of(x, "x"), M, K, d, vec_ok(x2) && vec_ok(o2),
                                c10::cuda::getCurrentCUDAStream()));
}

void dropout_add(const Tensor& out, const Tensor& t, const Dropout& d, double dropout_p) {
  if (t.numel() == 0) return;
  const int64_t K = t.dim() == 0 ? 1 : t.size(-1), M = t.numel() / K;
  const Tensor tc = t.contiguous();
  Tensor oc = out.is_contiguous() ? out : out.contiguous();  // the kernel indexes [M, K] row-major
  C10_CUDA_CHECK(launch_dropout_add(oc.data_ptr(), any_dtype_of(oc, "out"), tc.data_ptr(), any_dtype_of(tc, "t"), M,
                                    K, d, 1.0 / (1.0 - dropout_p), c10::cuda::getCurrentCUDAStream()));
  if (!oc.is_same(out)) out.copy_(oc);
}

void dropout_mask(const Tensor& out, const Dropout& d) {
  TORCH_INTERNAL_ASSERT(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kBool);
  C10_CUDA_CHECK(launch_dropout_mask(out.data_ptr<bool>(), out.size(0), out.size(1), d,
                                     c10::cuda::getCurrentCUDAStream()));
}

}  // namespace cuda
}  // namespace lora_kernels
