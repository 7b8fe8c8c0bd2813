"""A kernel launch as data, so the exact configs we run can also be compiled ahead of time for a GPU.

Each launcher builds `Launch` objects (kernel, grid, runtime args, constexprs, warps, stages) and runs
them. The AOT tests build the same objects from meta tensors and compile them with
`triton.compile(..., target=GPUTarget("cuda", cc, 32))` on a machine without a GPU, then read register,
spill-stack and shared-memory use from the cubin.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch

_TL_DTYPE = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}

# The device guard Launch.run enters for CUDA tensors on a device other than the current one (module
# attributes, so a CPU test can watch them being used).
_current_cuda_device = torch.cuda.current_device
_cuda_device_guard = torch.cuda.device


@dataclass
class Launch:
    kernel: object                      # a @triton.jit function
    grid: tuple
    args: dict                          # runtime arguments by name: tensors, ints, floats
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def device(self) -> torch.device | None:
        """The device of the first tensor argument: every tensor of a launch lives there."""
        return next((v.device for v in self.args.values() if isinstance(v, torch.Tensor)), None)

    def run(self) -> None:
        if not all(g > 0 for g in self.grid):
            return
        dev = self.device()
        # Triton launches on the current CUDA device and its stream; tensors on another device (a model
        # split over GPUs) need that device made current first. Skipped when it already is (host cost).
        if dev is not None and dev.type == "cuda" and dev.index is not None and dev.index != _current_cuda_device():
            with _cuda_device_guard(dev.index):
                self._launch()
        else:
            self._launch()

    def _launch(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def signature(self) -> dict:
        """Triton type strings for every parameter, as `triton.compile` wants them."""
        sig = {}
        for name, v in self.args.items():
            if isinstance(v, torch.Tensor):
                sig[name] = "*" + _TL_DTYPE[v.dtype]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"cannot type argument {name}={v!r}")
        for name in self.constexprs:
            sig[name] = "constexpr"
        return sig

    def kernel_name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def describe(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel_name()}[{meta},warps={self.num_warps},stages={self.num_stages}]"

    def ttir(self, cc: int = 90) -> str:
        """The kernel's Triton IR for this launch's specialization (front end only: fast, no GPU, but not
        under TRITON_INTERPRET=1). Branches on constexprs are resolved, so it shows what this launch does."""
        from triton._C.libtriton import ir
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend

        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": self.num_warps, "num_stages": self.num_stages})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        src = ASTSource(self.kernel, *_jit_specialization(self))
        module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                             backend.get_module_map(), context)
        return str(module)

    def atomic_ops(self) -> Counter:
        """Atomic read-modify-writes in this launch's Triton IR, counted by (op, semantics), e.g.
        {("fadd", "relaxed"): 1}. Derived from the kernel's code, so it cannot disagree with what runs."""
        return Counter(re.findall(r"tt\.atomic_rmw\s+(\w+)\s*,\s*(\w+)", self.ttir()))


def _jit_specialization(launch: Launch):
    """(signature, constexprs, attrs) as Triton's JIT would specialize this launch: ints equal to 1 become
    constants, 16-divisible ints and 16-byte-aligned pointers get `tt.divisibility` (vectorised loads).
    Meta tensors report address 0, i.e. aligned like a fresh CUDA allocation; a launch on an unaligned
    view or odd strides compiles a less specialized variant, which this check does not cover."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, consts, attrs = launch.signature(), dict(launch.constexprs), {}
    params = {p.name: p for p in launch.kernel.params}
    for name, v in launch.args.items():
        p = params[name]
        if isinstance(v, (bool, float)) or p.do_not_specialize:
            continue
        kind, spec = native_specialize_impl(BaseBackend, v, False, True, not p.do_not_specialize_on_alignment)
        if kind == "constexpr":
            sig[name], consts[name] = "constexpr", spec
        elif spec == "D":
            attrs[(p.num,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def aot_compile(launch: Launch, cc: int):
    """Compile `launch` for an NVIDIA GPU of compute capability `cc` (80, 90), no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.kernel, *_jit_specialization(launch))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def cuobjdump(compiled, *flags: str) -> str:
    """Output of the cuobjdump bundled with Triton on the compiled kernel's cubin."""
    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([exe, *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict:
    """{"registers", "stack" (spill bytes), "shared" (bytes)} read from the cubin with cuobjdump."""
    out = cuobjdump(compiled, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": compiled.metadata.shared}


# Opt-in shared memory per block (bytes): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
