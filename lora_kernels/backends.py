"""Which implementations of the ops this machine can run, and what `backend=None` falls back to.

Backends:
    "torch"      PyTorch ops only (any device, any float dtype); on CPU it regenerates the dropout mask with
                 the extension's vectorised generator when that is built.
    "native"     the C++/CUDA extension lora_kernels._C (CPU always; CUDA when it was built with nvcc).
    "triton"     fully fused Triton kernels (the base GEMM with the LoRA term in its epilogue).
    "composite"  the base GEMM by the vendor BLAS (cuBLAS through torch) plus Triton kernels for the LoRA
                 work (shrink with the regenerated mask, one-pass expand into the GEMM's output, dS/dB, dA).
Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests only).

`backend=None` asks `lora_kernels.dispatch` (measured dispatch, cached per device); when nothing is measured
it runs `default_backend(device)`: "composite" on CUDA (cuBLAS is never slower than cuBLAS, and the LoRA
kernels are memory-bound), and on CPU the backend `make bench` measured fastest there (see CPU_DEFAULT).

Everything is probed once at import (plain module constants), so torch.compile traces these checks
as constants instead of breaking the graph.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "native", "composite")

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton's interpreter (TRITON_INTERPRET=1, read when kernels are defined) runs kernels on CPU tensors.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from lora_kernels import _C as NATIVE  # the compiled extension; registers torch.ops.lora_kernels.native_*
    NATIVE_ERROR = ""
    NATIVE_CUDA = bool(getattr(NATIVE, "WITH_CUDA", 0))
except ImportError as e:  # not built (LORA_KERNELS_NO_EXT=1, no compiler) or built for another torch
    NATIVE, NATIVE_ERROR, NATIVE_CUDA = None, str(e), False

# The untuned CPU choice. Measured with `make bench` (lora_linear and multi_lora suites, 2-core CPU):
# see the note in bench/README.md; "torch" when the extension is not built.
CPU_DEFAULT = "native" if NATIVE is not None else "torch"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = ["torch"]
    if HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)):
        out += ["triton", "composite"]
    if NATIVE is not None and (device.type == "cpu" or (device.type == "cuda" and NATIVE_CUDA)):
        out.append("native")
    return out


def default_backend(device: torch.device | str) -> str:
    """What backend=None runs when measured dispatch has no choice for a call."""
    kind = device if isinstance(device, str) else device.type
    if kind == "cuda":
        return "composite" if HAS_TRITON else "torch"
    return CPU_DEFAULT if kind == "cpu" else "torch"


_AVAILABLE: dict[str, frozenset] = {}  # device type -> available backends (checked on every call)


def check_backend(backend: str | None, device: torch.device) -> None:
    """Raise a clear error for an unknown backend, or one that cannot run on `device`. None is always fine."""
    if backend is None:
        return
    avail = _AVAILABLE.get(device.type)
    if avail is None:
        avail = _AVAILABLE[device.type] = frozenset(available_backends(device))
    if backend in avail:
        return
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "native":
        if NATIVE is not None and torch.device(device).type == "cuda":
            raise RuntimeError(
                "backend='native' on CUDA needs lora_kernels._C built with CUDA, but it was built without "
                "(torch was a CPU build, or nvcc was not found). Rebuild it with a CUDA torch and CUDA_HOME "
                "set: pip install --no-build-isolation -e . (or use backend=None / 'composite' / 'triton').")
        raise RuntimeError(
            "backend='native' needs the compiled extension lora_kernels._C, which is not available "
            f"({NATIVE_ERROR}). Build it with `pip install --no-build-isolation -e .` (a CUDA build when "
            "nvcc and a CUDA torch are present), or pick backend=None / 'torch'.")
    if not HAS_TRITON:
        raise RuntimeError(f"backend={backend!r} needs the `triton` package: pip install triton")
    raise RuntimeError(
        f"backend={backend!r} cannot run on device {device}: Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before importing lora_kernels, for testing).")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Validate an explicit backend for `device`, or give `default_backend(device)` for None."""
    if backend is None:
        return default_backend(device)
    check_backend(backend, device)
    return backend
