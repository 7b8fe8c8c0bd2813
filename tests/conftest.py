import pytest
import torch

import lora_kernels

# Relative error bounds vs. the float64 reference, by the dtype of the activations. fp32 is tight;
# 16-bit inputs are rounded to their mantissa (8 bits for bf16, 11 for fp16) before any kernel sees them.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Elementwise |out - ref| <= tol * (|ref| + max|ref|), a relative-norm bound, and no NaN/inf."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten or NaN)"
    if ref.numel() == 0:
        return
    tol = TOL[dtype]
    scale = ref.abs().max().item()
    err = (out64 - ref).abs()
    bad = err > tol * (ref.abs() + scale)
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, max err {err.max().item():.3e} "
                           f"at scale {scale:.3e} (tol {tol})")
    rel = ((out64 - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert rel <= tol, f"{name}: relative error {rel:.3e} > {tol}"


def cuda_param(value="cuda"):
    return pytest.param(value, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")])


def require_backend(backend: str, device: str) -> None:
    if backend not in lora_kernels.available_backends(device):
        why = {"triton": "Triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)",
               "native": "the lora_kernels._C extension is not built"}.get(backend, "")
        pytest.skip(f"backend {backend!r} not available on {device}: {why}")
