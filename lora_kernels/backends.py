"""Which implementations of the ops this machine can run, and which one `backend=None` picks.

Everything is probed once at import (plain module constants), so torch.compile traces these checks
as constants instead of breaking the graph.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "native")

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
except ImportError as e:  # not built (LORA_KERNELS_NO_EXT=1, no compiler) or built for another torch
    NATIVE, NATIVE_ERROR = None, str(e)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = ["torch"]
    if HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRETED)):
        out.append("triton")
    if NATIVE is not None:
        out.append("native")
    return out


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Validate an explicit backend for `device`, or pick the fastest one when `backend` is None."""
    if backend is None:
        # The interpreter is for testing only: on CPU the composite PyTorch path is the fast one.
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend not in available_backends(device):
        if backend == "native":
            raise RuntimeError(
                "backend='native' needs the compiled extension lora_kernels._C, which is not available "
                f"({NATIVE_ERROR}). Build it with `pip install --no-build-isolation -e .` (a CUDA build when "
                "nvcc and a CUDA torch are present), or pick backend='triton' / 'torch'."
            )
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the `triton` package: pip install triton")
        raise RuntimeError(
            f"backend='triton' cannot run on device {device}: Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before importing lora_kernels, for testing)."
        )
    return backend
