"""GPU-only checks that the CPU test suite cannot make (run with `pytest -m gpu` on a CUDA machine):

* `lora_linear` forward and backward on tensors of more than 2^31 elements (x, y, dy and dx), against a
  float64 reference on sampled rows including the last ones (offsets past 2^31), and on the full
  reductions dA, dB computed in float64 chunks; every output is poisoned with NaN first when the Triton
  launcher supports it, so an element left unwritten fails.
* CUDA-graph capture of a decode step: `lora_linear` (triton / native) and, when the op exists,
  `multi_lora_linear`; the graph is replayed on new inputs and compared with the reference.
"""
from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from conftest import assert_close_to_ref
from lora_kernels import backends
from lora_kernels.reference import lora_linear_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(backends.TRITON_INTERPRETED, reason="TRITON_INTERPRET=1: these tests are for real CUDA kernels"),
]

GPU_BACKENDS = ["triton", "native"]


def _need_backend(backend: str) -> None:
    if backend not in backends.available_backends("cuda"):
        why = backends.NATIVE_ERROR if backend == "native" else "triton not installed"
        pytest.skip(f"backend {backend!r} not available: {why}")


@pytest.fixture
def poison(monkeypatch):
    """Fill the Triton launchers' output buffers with NaN before the kernels run, when supported."""
    try:
        import lora_kernels.kernels.lora_linear as kl
    except ImportError:
        return
    if hasattr(kl, "POISON_OUTPUTS"):
        monkeypatch.setattr(kl, "POISON_OUTPUTS", True)


# --------------------------------------------------------------------------------------------------------
# > 2^31 elements
# --------------------------------------------------------------------------------------------------------

# x, y, dy, dx: [M, 128] with M * 128 = 2^31 + 2176 elements, so the last rows sit past 2^31. A small
# rank (not a multiple of 16) keeps the float64 reference of the full reductions dA, dB at ~90 GFLOP.
BIG_M, BIG_K, BIG_N, BIG_R = 2**24 + 17, 128, 128, 5
BIG_SCALING = 0.5


@pytest.fixture(scope="module")
def big_inputs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    free, total = torch.cuda.mem_get_info()
    need = 30e9  # x, dy, y, dx (4.3 GB each in bf16), S and dS (1.1 GB each), reference chunks, slack
    if free < need:
        pytest.skip(f"needs ~{need / 1e9:.0f} GB of free GPU memory, has {free / 1e9:.1f} GB")
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(BIG_M, BIG_K, device="cuda", dtype=dt, generator=g)
    dy = torch.randn(BIG_M, BIG_N, device="cuda", dtype=dt, generator=g)
    W = (torch.randn(BIG_N, BIG_K, device="cuda", generator=g) * BIG_K ** -0.5).to(dt)
    bias = torch.randn(BIG_N, device="cuda", generator=g).to(dt)
    # fp32 adapters next to bf16 activations: PEFT's default for training
    A = torch.randn(BIG_R, BIG_K, device="cuda", generator=g) * BIG_K ** -0.5
    B = torch.randn(BIG_N, BIG_R, device="cuda", generator=g) * BIG_R ** -0.5
    yield x, dy, W, bias, A, B
    del x, dy
    torch.cuda.empty_cache()


def _sample_rows(M: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1)
    rows = torch.cat([torch.arange(0, 256), torch.randint(0, M, (2048,), generator=g),
                      torch.arange(M - 1024, M)])
    return rows.cuda()


@pytest.fixture(scope="module")
def big_reference(big_inputs):
    """Float64 (dA, dB) of the big case, computed once for every backend."""
    x, dy, _, _, A, B = big_inputs
    return _chunked_dA_dB(x, dy, A, B, BIG_SCALING)


def _chunked_dA_dB(x, dy, A, B, s, chunk=2**20):
    """Float64 dA = (s·dy B)ᵀ x and dB = s·dyᵀ (x Aᵀ), summed over row chunks."""
    A64, B64 = A.double(), B.double()
    dA = torch.zeros_like(A64)
    dB = torch.zeros_like(B64)
    for i in range(0, x.shape[0], chunk):
        xc, gc = x[i:i + chunk].double(), dy[i:i + chunk].double()
        dS = s * (gc @ B64)
        dA += dS.T @ xc
        dB += s * (gc.T @ (xc @ A64.T))
    return dA, dB


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lora_linear_more_than_2_31_elements(backend, big_inputs, big_reference, poison):
    _need_backend(backend)
    x, dy, W, bias, A, B = big_inputs
    assert x.numel() > 2**31 and dy.numel() > 2**31
    s = BIG_SCALING
    xg = x.detach().requires_grad_()
    Ag, Bg = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    y = lk.lora_linear(xg, W, bias, Ag, Bg, s, backend=backend)
    assert y.shape == (BIG_M, BIG_N) and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "non-finite output: an element was not written or overflowed"

    rows = _sample_rows(BIG_M)
    ref, _ = lora_linear_forward(x[rows].double(), W.double(), bias.double(), A.double(), B.double(), s)
    assert_close_to_ref(y[rows], ref, x.dtype, "y (sampled rows, incl. the last ones past 2^31)")

    dx, dA, dB = torch.autograd.grad(y, [xg, Ag, Bg], dy)
    del y
    assert torch.isfinite(dx).all(), "non-finite dx"
    G = dy[rows].double()
    dx_ref = G @ W.double() + (s * (G @ B.double())) @ A.double()
    assert_close_to_ref(dx[rows], dx_ref, x.dtype, "dx (sampled rows)")
    del dx
    dA_ref, dB_ref = big_reference
    # Sums over 2^24 rows: compare relative to the result's scale.
    for name, got, want in (("dA", dA, dA_ref), ("dB", dB, dB_ref)):
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-2, f"{name}: max error {err:.2e} of the largest element"


# --------------------------------------------------------------------------------------------------------
# CUDA-graph capture of a decode step
# --------------------------------------------------------------------------------------------------------

def _capture(fn):
    """Warm `fn` up on a side stream, capture it, return (graph, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_lora_linear_decode_step_cuda_graph(backend, tokens):
    _need_backend(backend)
    torch.manual_seed(0)
    dt, K, N, r, s = torch.bfloat16, 1000, 1500, 12, 2.0  # not multiples of the block sizes
    x_static = torch.randn(tokens, K, device="cuda", dtype=dt)
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).to(dt)
    bias = torch.randn(N, device="cuda").to(dt)
    A = torch.randn(r, K, device="cuda") * K ** -0.5
    B = torch.randn(N, r, device="cuda") * r ** -0.5

    def step():
        with torch.no_grad():
            return lk.lora_linear(x_static, W, bias, A, B, s, backend=backend)

    _replay_and_check(step, x_static, dt, lambda xd: lora_linear_forward(
        xd, W.double(), bias.double(), A.double(), B.double(), s)[0])


def _replay_and_check(step, x_static, dt, reference):
    """Capture `step` in a CUDA graph, replay it on 3 fresh inputs, compare each with reference(x float64)."""
    graph, y_static = _capture(step)
    for _ in range(3):
        x_new = torch.randn(x_static.shape, device="cuda", dtype=dt)
        x_static.copy_(x_new)
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_ref(y_static, reference(x_new.double()), dt, "graph replay output")


def _multi_lora_api():
    try:
        from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear
    except ImportError as e:
        pytest.skip(f"multi_lora_linear not available: {e}")
    return LoRABatch, multi_lora_linear


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_multi_lora_decode_step_cuda_graph(backend):
    LoRABatch, multi_lora_linear = _multi_lora_api()
    _need_backend(backend)
    torch.manual_seed(0)
    dt, K, N, r, slots, T = torch.bfloat16, 1000, 1500, 12, 7, 37
    x_static = torch.randn(T, K, device="cuda", dtype=dt)
    W = (torch.randn(N, K, device="cuda") * K ** -0.5).to(dt)
    A_stack = (torch.randn(slots, r, K, device="cuda") * K ** -0.5).to(dt)
    B_stack = (torch.randn(slots, N, r, device="cuda") * r ** -0.5).to(dt)
    scalings = torch.linspace(0.5, 2.0, slots, device="cuda")
    # decode: one token per sequence, adapters shuffled, one slot unused, some tokens without adapter (-1)
    token_adapter = torch.randint(0, slots - 1, (T,), device="cuda", dtype=torch.int32)
    token_adapter[::9] = -1
    batch = LoRABatch.from_token_adapters(token_adapter, slots)

    def step():
        with torch.no_grad():
            return multi_lora_linear(x_static, W, None, A_stack, B_stack, scalings, batch, backend=backend)

    def reference(xd):
        ref = xd @ W.double().T
        for t in range(T):
            j = int(token_adapter[t])
            if j >= 0:
                ref[t] += scalings[j].double() * (xd[t] @ A_stack[j].double().T) @ B_stack[j].double().T
        return ref

    _replay_and_check(step, x_static, dt, reference)
