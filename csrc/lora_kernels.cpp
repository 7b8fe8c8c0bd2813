// lora_kernels._C: the op schemas (TORCH_LIBRARY), their CPU and CUDA registrations, the Python module
// object, and the shared host helpers. The only file that includes torch/library.h (slow to compile).
//
// Every op is `lora_kernels::native_<name>`, the native backend of the Python op `lora_kernels::<name>`
// (same arguments minus `backend`). CPU implementations live in csrc/*_cpu.cpp, CUDA ones in csrc/cuda/.
// Fake (meta) and autograd registrations are added in Python by lora_kernels/ops/native.py.
#include <Python.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <sstream>

#include "dropout_cpu.h"
#include "ops.h"

// `import lora_kernels._C` loads this library, whose static initialisers register the ops below.
// No pybind11: the module object only carries build flags.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "Compiled ops of lora_kernels (torch.ops.lora_kernels.native_*).",
                                          -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LK_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  // The instruction set of the CPU dropout-mask generator picked for this machine ("avx2" or "scalar").
  PyModule_AddStringConstant(m, "CPU_DROPOUT_ISA", lora_kernels::dropout_cpu_isa());
  return m;
}

TORCH_LIBRARY(lora_kernels, m) {
  // Fake implementations are in this Python module (torch imports it when a fake kernel is needed).
  m.set_python_module("lora_kernels.ops.native");
  // Single-adapter fused LoRA linear (lora_kernels/ops/lora_linear.py).
  m.def("native_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("native_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor S, "
        "float scaling, float dropout_p, Tensor? seed, bool need_dx, bool need_dA, bool need_dB) "
        "-> (Tensor, Tensor, Tensor)");
  // The seeded dropout of lora_kernels.dropout, for a tensor viewed as [numel / K, K], K = size(-1):
  // x̂ = x ⊙ keep(seed) / (1 - p) as a new contiguous tensor in `dtype` (default x's), x of any strides;
  m.def("native_dropout(Tensor x, float dropout_p, Tensor seed, ScalarType? dtype=None) -> Tensor");
  // out += t ⊙ keep(seed) / (1 - p) in one pass (the mask of t's view; out and t of one shape, any strides);
  m.def("native_dropout_add_(Tensor(a!) out, Tensor t, float dropout_p, Tensor seed) -> ()");
  // the boolean keep-mask [M, K] itself (on `device`, default CPU).
  m.def("native_dropout_mask(Tensor seed, int M, int K, float dropout_p, Device? device=None) -> Tensor");
  // Multi-adapter serving (lora_kernels/ops/multi_lora.py); the seven LoRABatch tensors in schema order.
  m.def("native_lora_shrink(Tensor x, Tensor[] A_stacks, Tensor token_adapter, Tensor sorted_token_ids, "
        "Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end, "
        "Tensor? ranks) -> Tensor");
  m.def("native_lora_expand(Tensor S, Tensor[] B_stacks, Tensor token_adapter, Tensor sorted_token_ids, "
        "Tensor seg_starts, Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end, "
        "Tensor(a!) y, Tensor scalings, Tensor? ranks, SymInt y_offset) -> ()");
  m.def("native_multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] A_stacks, Tensor[] B_stacks, "
        "Tensor scalings, Tensor token_adapter, Tensor sorted_token_ids, Tensor seg_starts, Tensor seg_lens, "
        "Tensor tile_slot, Tensor tile_start, Tensor tile_end, Tensor? ranks, Tensor? col_scale=None) -> Tensor");
  // Multi-adapter training (CPU only): per-slot dropout [L] active iff seed is given; (y, S) and (dx, [dA_i], [dB_i])
  // with a gradient not needed as an empty tensor / list.
  m.def("native_multi_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor[] A_stacks, Tensor[] B_stacks, "
        "Tensor scalings, Tensor token_adapter, Tensor sorted_token_ids, Tensor seg_starts, Tensor seg_lens, "
        "Tensor tile_slot, Tensor tile_start, Tensor tile_end, Tensor? ranks, Tensor? dropout, Tensor? seed) "
        "-> (Tensor, Tensor)");
  m.def("native_multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor[] A_stacks, Tensor[] B_stacks, "
        "Tensor S, Tensor scalings, Tensor token_adapter, Tensor sorted_token_ids, Tensor seg_starts, "
        "Tensor seg_lens, Tensor tile_slot, Tensor tile_start, Tensor tile_end, Tensor? ranks, Tensor? dropout, "
        "Tensor? seed, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor[], Tensor[])");
  // The [out, r] tail of DoRA's row norm (lora_kernels/ops/dora.py, dora_weight_norm) given V = W0 Aᵀ and A Aᵀ:
  // n = √max(n2, 0), n2 = w2 + extra + rowsum(B ⊙ (2s V + s² B AAt)), and −1 where n2 < cancel · w2.
  m.def("native_dora_norm(Tensor V, Tensor B, Tensor AAt, Tensor w2, Tensor? extra, float scaling, float cancel) "
        "-> Tensor");
}

#define LK_REGISTER_OPS(dev)                                              \
  m.impl("native_lora_linear_fwd", &lora_kernels::lora_linear_fwd_##dev);   \
  m.impl("native_lora_linear_bwd", &lora_kernels::lora_linear_bwd_##dev);   \
  m.impl("native_dropout", &lora_kernels::dropout_##dev);                   \
  m.impl("native_dropout_add_", &lora_kernels::dropout_add_##dev);          \
  m.impl("native_dropout_mask", &lora_kernels::dropout_mask_##dev);         \
  m.impl("native_lora_shrink", &lora_kernels::lora_shrink_##dev);           \
  m.impl("native_lora_expand", &lora_kernels::lora_expand_##dev);           \
  m.impl("native_multi_lora_linear", &lora_kernels::multi_lora_linear_##dev);   \
  m.impl("native_dora_norm", &lora_kernels::dora_norm_##dev);

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  LK_REGISTER_OPS(cpu)
  m.impl("native_multi_lora_linear_fwd", &lora_kernels::multi_lora_linear_fwd_cpu);
  m.impl("native_multi_lora_linear_bwd", &lora_kernels::multi_lora_linear_bwd_cpu);
}

// The training ops have no CUDA kernels: on CUDA the Python layer runs the native shrink / expand forward and the
// torch backward instead. A direct call says what to use rather than the dispatcher's generic message.
namespace {
void cpu_only(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " is not implemented on CUDA in the native backend (CPU only); use "
              "backend=None/'composite'/'triton' for CUDA tensors.");
}
}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  for (const char* name : {"native_multi_lora_linear_fwd", "native_multi_lora_linear_bwd"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cpu_only>());
  }
}

#ifdef LK_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { LK_REGISTER_OPS(cuda) }
#else
// A CPU-only build still gives every op a CUDA kernel: one that says why, instead of the dispatcher's
// generic "could not run ... with arguments from the 'CUDA' backend".
namespace {
void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": lora_kernels._C was built without CUDA (torch was a CPU build, or nvcc was not found, when it was "
              "built). Rebuild it with a CUDA torch and CUDA_HOME set: pip install --no-build-isolation -e . "
              "(or use backend='triton' / 'torch').");
}
}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  for (const char* name : {"native_lora_linear_fwd", "native_lora_linear_bwd", "native_dropout", "native_dropout_add_",
                           "native_dropout_mask", "native_lora_shrink", "native_lora_expand",
                           "native_multi_lora_linear", "native_dora_norm"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
}
#endif

namespace lora_kernels {

std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

at::ScalarType lora_compute_dtype(const Tensor& x, const Tensor& lora_A) {
  return c10::promoteTypes(c10::promoteTypes(x.scalar_type(), lora_A.scalar_type()), at::kFloat);
}

Dropout make_dropout(double dropout_p, const OptTensor& seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  Dropout d;
  if (!seed.has_value()) return d;
  const Tensor& s = *seed;
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kLong && s.numel() == 1,
              "seed must be None or a CPU int64 tensor with one element, got ", s.scalar_type(), " ",
              shape_str(s), " on ", s.device());
  d.active = true;
  d.seed = static_cast<uint64_t>(s.item<int64_t>());  // CPU tensor: no device synchronisation
  d.threshold = keep_threshold(dropout_p);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return d;
}

void check_dropout_args(const Tensor& x, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(!dtype.has_value() || at::isFloatingType(*dtype), "dtype must be a floating-point dtype, got ", *dtype);
}

void check_dropout_add_args(const Tensor& out, const Tensor& t) {
  TORCH_CHECK(out.sizes() == t.sizes(), "dropout_add_: t must have out's shape ", shape_str(out), ", got ",
              shape_str(t));
  TORCH_CHECK(out.device() == t.device(), "dropout_add_: out and t must be on one device, got out:", out.device(),
              " t:", t.device());
  const auto ot = out.scalar_type(), tt = t.scalar_type();
  TORCH_CHECK(ot == at::kHalf || ot == at::kBFloat16 || ot == at::kFloat || ot == at::kDouble,
              "dropout_add_: out must be float16, bfloat16, float32 or float64, got ", ot);
  TORCH_CHECK(tt == at::kFloat || tt == at::kDouble, "dropout_add_: t must be float32 or float64, got ", tt);
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, t);
}

void check_lora_linear_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scaling, bool cuda) {
  TORCH_CHECK(x.dim() == 2, "x must have shape [M, in], got ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2, "weight must have shape [out, in], got ", shape_str(weight));
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(x.size(1) == in_f, "x must have shape [M, in=", in_f, "] to match weight ", shape_str(weight),
              ", got ", shape_str(x));
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in_f && lora_A.size(0) >= 1,
              "lora_A must have shape [r, in=", in_f, "] with r >= 1, got ", shape_str(lora_A));
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_f && lora_B.size(1) == r,
              "lora_B must have shape [out=", out_f, ", r=", r, "], got ", shape_str(lora_B));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f, "bias must be None or have shape [out=", out_f,
                "], got ", shape_str(*bias));
    TORCH_CHECK(bias->device() == x.device(), "bias must be on x's device ", x.device(), ", got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(), " must equal x dtype ",
                x.scalar_type());
  }
  TORCH_CHECK(weight.device() == x.device() && lora_A.device() == x.device() && lora_B.device() == x.device(),
              "x, weight, lora_A and lora_B must be on one device, got x:", x.device(), " weight:", weight.device(),
              " lora_A:", lora_A.device(), " lora_B:", lora_B.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(lora_A.scalar_type()),
              "x and lora_A must be floating point, got ", x.scalar_type(), " and ", lora_A.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), "lora_A (", lora_A.scalar_type(), ") and lora_B (",
              lora_B.scalar_type(), ") must have one dtype");
  TORCH_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  if (cuda) {
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
                "the CUDA kernels support x of dtype float16, bfloat16 or float32, got ", dt);
    TORCH_CHECK(lora_A.scalar_type() == dt || lora_A.scalar_type() == at::kFloat,
                "the CUDA kernels need lora_A/lora_B in x's dtype (", dt, ") or float32, got ",
                lora_A.scalar_type());
  }
}

void check_lora_linear_bwd_args(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                const Tensor& S) {
  const int64_t M = x.size(0), out_f = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == out_f, "dy must have shape [M=", M, ", out=",
              out_f, "], got ", shape_str(dy));
  TORCH_CHECK(dy.device() == x.device() && S.device() == x.device(), "dy and S must be on x's device ",
              x.device(), ", got dy:", dy.device(), " S:", S.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy dtype ", dy.scalar_type(), " must equal x dtype ",
              x.scalar_type());
  TORCH_CHECK(S.dim() == 2 && S.size(0) == M && S.size(1) == r, "S must have shape [M=", M, ", r=", r,
              "], got ", shape_str(S));
  TORCH_CHECK(at::isFloatingType(S.scalar_type()), "S must be floating point, got ", S.scalar_type());
}

}  // namespace lora_kernels
