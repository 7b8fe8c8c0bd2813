"""DoRA in 16-bit: `lk.dora_linear` with x / W0 in bfloat16 and float16 (adapters in x's dtype or float32), on
the "torch" and "native" backends and "triton" (TRITON_INTERPRET=1 on CPU), forward and every gradient against
the float64 reference on the same (rounded) inputs.

Tolerance, per output and gradient, as FlashAttention's tests bound theirs: our relative RMS error against the
float64 reference must be at most 2x PyTorch's own error for the same computation in that dtype (PEFT's DoRA math
written with plain torch ops on the 16-bit tensors, autograd for the gradients) plus one unit roundoff of the
dtype (2^-8 bfloat16, 2^-11 float16: both results are rounded to the dtype once at the end, and where PyTorch's
own error is tiny -- a gradient accumulated in float32 by both -- that rounding alone sets the floor). On top of
that, conftest's per-dtype table (`assert_close_to_ref`: 3e-2 bfloat16, 4e-3 float16) bounds every element.
"""
from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from conftest import assert_close_to_ref, require_backend
from lora_kernels import reference
from lora_kernels.dropout import dropout_mask, new_seed

pytestmark = pytest.mark.usefixtures("one_thread")

IN, OUT, M = 37, 29, 7  # not multiples of any block size
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
NAMES = ["x", "lora_A", "lora_B", "magnitude", "lora_bias"]



def inputs(dtype, lora_dtype, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W = rnd(OUT, IN) / IN ** 0.5
    t = dict(x=rnd(M, IN).to(dtype), weight=W.to(dtype), bias=rnd(OUT).to(dtype),
             lora_A=(rnd(r, IN) / IN ** 0.5).to(lora_dtype), lora_B=(rnd(OUT, r) / r ** 0.5).to(lora_dtype),
             lora_bias=(0.3 * rnd(OUT)).to(lora_dtype))
    t["magnitude"] = (torch.linalg.vector_norm(W, dim=1) * (1 + 0.3 * rnd(OUT))).to(lora_dtype)  # g far from 1
    return t


def pytorch_dora(t, scaling, keep, p):
    """PEFT's DoRA math with plain torch ops on the given (16-bit) tensors: PyTorch's own error in that dtype."""
    x, W, A, B, m, c = (t[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "lora_bias"))
    with torch.no_grad():
        n = torch.linalg.vector_norm(W + scaling * (B @ A + c[:, None]).to(W.dtype), dim=1)
    g = m / n
    x_hat = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    lora = (x_hat.to(A.dtype) @ A.t() @ B.t() + c) * scaling
    y = x @ W.t() + t["bias"] + (g - 1).to(x.dtype) * (x_hat @ W.t()) + g * lora
    return y.to(x.dtype)


def rel_rms(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def case_params():
    for backend in ("torch", "native", "triton"):
        for dtype in (torch.bfloat16, torch.float16):
            for lora_fp32 in (False, True):
                for p in (0.0, 0.2):
                    yield pytest.param(backend, dtype, lora_fp32, p,
                                       id=f"{backend}-{str(dtype)[6:]}-{'lora=fp32' if lora_fp32 else 'lora=x'}-p{p}")


@pytest.mark.parametrize("backend, dtype, lora_fp32, p", list(case_params()))
def test_dora_16bit_matches_reference_within_pytorch_s_own_error(backend, dtype, lora_fp32, p):
    require_backend(backend, "cpu")
    r, scaling = 3, 0.75
    t = inputs(dtype, torch.float32 if lora_fp32 else dtype, r)
    diff = ["x", "lora_A", "lora_B", "magnitude", "lora_bias"]
    ours = {k: t[k].clone().requires_grad_() for k in diff}
    torch.manual_seed(11)
    y = lk.dora_linear(ours["x"], t["weight"], t["bias"], ours["lora_A"], ours["lora_B"], ours["magnitude"],
                       scaling, dropout_p=p, training=True, backend=backend, lora_bias=ours["lora_bias"])
    assert y.dtype == dtype
    torch.manual_seed(11)
    keep = dropout_mask(new_seed(), (M, IN), p) if p else None
    ref = {k: t[k].double().requires_grad_() for k in diff}
    y_ref = reference.dora_linear_forward(ref["x"], t["weight"].double(), t["bias"].double(), ref["lora_A"],
                                          ref["lora_B"], ref["magnitude"], scaling, keep, p, ref["lora_bias"])
    pt = {k: t[k].clone().requires_grad_() for k in diff}
    y_pt = pytorch_dora(dict(t, **pt), scaling, keep, p)
    dy = torch.randn(M, OUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = [y] + list(torch.autograd.grad(y, [ours[k] for k in diff], dy.to(dtype)))
    want = [y_ref] + list(torch.autograd.grad(y_ref, [ref[k] for k in diff], dy))
    own = [y_pt] + list(torch.autograd.grad(y_pt, [pt[k] for k in diff], dy.to(dtype)))
    for name, a, w, o in zip(["y"] + ["d" + n for n in NAMES], got, want, own):
        assert a.dtype == o.dtype, name  # each gradient in its tensor's dtype
        assert_close_to_ref(a, w, dtype, name)  # finite, and conftest's per-dtype element bound
        err, err_pt = rel_rms(a, w), rel_rms(o, w)
        assert err <= 2 * err_pt + UNIT_ROUNDOFF[dtype], f"{name}: {err:.3e} > 2 x PyTorch's {err_pt:.3e} + u"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_qdora_16bit_with_dropout_matches_dense_dora_in_float64(dtype):
    """QDoRA with 16-bit x and dropout (its backward's dropped base term computed in float32): y and every
    gradient against the float64 reference over deq(W0), within conftest's per-dtype bound."""
    bnb = pytest.importorskip("bitsandbytes", reason="QDoRA needs bitsandbytes: pip install 'lora_kernels[qlora]'")
    from lora_kernels import quant
    g = torch.Generator().manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128, generator=g) / 128 ** 0.5, requires_grad=False,
                                     quant_type="nf4")
    qw = quant.from_bnb(layer.to("cpu"))
    Wd = qw.dequantize(torch.float64)
    t = dict(x=torch.randn(5, 128, generator=g).to(dtype), lora_A=torch.randn(8, 128, generator=g) / 128 ** 0.5,
             lora_B=torch.randn(96, 8, generator=g) / 8 ** 0.5,
             magnitude=torch.linalg.vector_norm(Wd.float(), dim=1) * (1 + 0.3 * torch.randn(96, generator=g)))
    ours = {k: v.clone().requires_grad_() for k, v in t.items()}
    torch.manual_seed(3)
    y = lk.dora_linear(ours["x"], qw, None, ours["lora_A"], ours["lora_B"], ours["magnitude"], 1.5, 0.2,
                       training=True, backend="torch")
    torch.manual_seed(3)
    keep = dropout_mask(new_seed(), (5, 128), 0.2)
    ref = {k: v.double().requires_grad_() for k, v in t.items()}
    y_ref = reference.dora_linear_forward(ref["x"], Wd, None, ref["lora_A"], ref["lora_B"], ref["magnitude"], 1.5,
                                          keep, 0.2)
    dy = torch.randn(5, 96, generator=g, dtype=torch.float64)
    assert y.dtype == dtype
    assert_close_to_ref(y, y_ref, dtype, "y")
    keys = ["x", "lora_A", "lora_B", "magnitude"]
    for k, a, w in zip(keys, torch.autograd.grad(y, [ours[k] for k in keys], dy.to(dtype)),
                       torch.autograd.grad(y_ref, [ref[k] for k in keys], dy)):
        assert_close_to_ref(a, w, dtype, "d" + k)
