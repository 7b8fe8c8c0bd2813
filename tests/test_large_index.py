"""64-bit indexing on CPU: element offsets past 2^31.

* (CI) Huge strides: small tensors whose elements lie more than 2^31 elements apart inside a lazily allocated
  storage (torch.empty of > 4 GiB touches only the pages written, so the resident memory stays a few MB). A
  kernel that computes `row * stride` in 32 bits reads or writes the wrong element. Every backend, forward
  and every gradient of lora_linear, lora_shrink / lora_expand / multi_lora_linear.
* (nightly) Dense tensors of (2^15 + 1) x 2^16 = 2^31 + 2^16 bf16 elements (4 GiB each; the peak is ~5 GiB
  per test, one test at a time) through the "torch" and "native" backends, against the float64 reference
  on row slices that include the rows past element 2^31. bf16 GEMMs of that size take minutes on a CPU
  without bf16 units, so these are marked `nightly` (see tests/conftest.py):
      LORA_KERNELS_NIGHTLY=1 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -ra -m nightly tests
"""
from __future__ import annotations

import gc
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops.multi_lora import LoRABatch

from conftest import assert_close_to_ref
from test_lora_linear import reference_outputs, run_op

BACKENDS = lk.available_backends("cpu")
BF16 = torch.bfloat16
BIG_STRIDE = 2**30 + 3  # row 2 of a [3, K] view starts at element 2^31 + 6
pytestmark = pytest.mark.skipif(sys.maxsize < 2**40, reason="needs a 64-bit address space")


def strided_copy(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a view of a lazily allocated storage whose element offsets pass 2^31: rows BIG_STRIDE
    apart ("rows"), or column-major with columns 2^26 + 1 apart so column 39 starts past 2^31 ("cols")."""
    M, K = t.shape
    if layout == "rows":
        strides = (BIG_STRIDE, 1)
    else:
        strides = (1, max(2**26 + 1, 2**31 // max(K - 1, 1) + 1))
    size = 1 + sum((n - 1) * s for n, s in zip(t.shape, strides))
    assert size > 2**31, "the view must reach past element 2^31"
    view = torch.empty(size, dtype=t.dtype).as_strided(t.shape, strides)
    view.copy_(t)
    return view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_lora_linear_huge_strides(backend, layout):
    g = torch.Generator().manual_seed(0)
    M, K, N, R = 3, 40, 24, 5
    x = strided_copy(torch.randn(M, K, generator=g).to(BF16), layout)
    dy = strided_copy(torch.randn(M, N, generator=g).to(BF16), layout)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(BF16)
    b = torch.randn(N, generator=g).to(BF16)
    A = (torch.randn(R, K, generator=g) / K**0.5).to(BF16)
    B = torch.randn(N, R, generator=g).to(BF16)
    torch.manual_seed(0)
    y, dx, dA, dB, seed = run_op(backend, x, W, b, A, B, dy, 0.5, 0.25)
    expected = reference_outputs(x, W, b, A, B, dy, 0.5, 0.25, seed)
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), expected):
        assert_close_to_ref(got.reshape(want.shape), want, BF16, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_huge_strides(backend):
    g = torch.Generator().manual_seed(1)
    T, K, widths, L, R = 3, 40, (16, 8), 2, 4
    x_small = torch.randn(T, K, generator=g).to(BF16)
    x = strided_copy(x_small, "rows")
    A = [(torch.randn(L, R, K, generator=g) / K**0.5).to(BF16) for _ in widths]
    B = [(torch.randn(L, n, R, generator=g) / R**0.5).to(BF16) for n in widths]
    W = (torch.randn(sum(widths), K, generator=g) / K**0.5).to(BF16)
    sc = torch.tensor([0.5, 2.0])
    ta = [1, -1, 0]  # the token past element 2^31 has an adapter
    batch = LoRABatch.from_token_adapters(ta, L)
    f64 = lambda ts: [t.double() for t in ts]
    S = lk.lora_shrink(x, A, batch, backend=backend)
    assert_close_to_ref(S, ref.multi_lora_shrink(x_small.double(), f64(A), ta), BF16, "S")
    y = lk.multi_lora_linear(x, W, None, A, B, sc, batch, backend=backend)
    assert_close_to_ref(y, ref.multi_lora_linear_forward(x_small.double(), W.double(), None, f64(A), f64(B), sc, ta),
                        BF16, "y")
    # expand into a y whose row 2 lies past element 2^31, after a 3-column offset
    y0 = torch.randn(T, 3 + sum(widths), generator=g).to(BF16)
    y_big = strided_copy(y0, "rows")
    lk.lora_expand(S, B, batch, y_big, sc, y_offset=3, backend=backend)
    expected = y0.double()
    expected[:, 3:] += ref.multi_lora_expand_delta(S.double(), f64(B), sc, ta)
    assert_close_to_ref(y_big, expected, BF16, "expand y")


# ----------------------------------------------------------------------------------------------- nightly

DENSE_T, DENSE_K, SLOTS, RANK = 2**15 + 1, 2**16, 64, 4
# Rows checked against the reference: the first, the middle, and the last two (row 2^15 starts at 2^31).
CHECK_ROWS = torch.tensor([0, 1, 2**14, 2**15 - 1, 2**15])


def dense_bf16(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [DENSE_T, DENSE_K] bf16 tensor (4 GiB) with distinct rows, row t = base[7t : 7t + K], and base."""
    base = torch.randn(7 * DENSE_T + DENSE_K, generator=torch.Generator().manual_seed(seed)).to(BF16)
    out = torch.empty(DENSE_T, DENSE_K, dtype=BF16)
    out.copy_(base.as_strided((DENSE_T, DENSE_K), (7, 1)))
    assert out.numel() > 2**31
    return out, base


def dense_batch(g):
    ta = torch.randint(-1, SLOTS, (DENSE_T,), generator=g)
    ta[CHECK_ROWS] = torch.tensor([3, -1, 7, 0, 5])  # the last row has an adapter
    return ta, LoRABatch.from_token_adapters(ta, SLOTS)


@pytest.fixture
def _free_memory():
    yield
    gc.collect()  # the next dense test allocates another 4 GiB


@pytest.mark.nightly
@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if b in BACKENDS])
def test_dense_shrink_expand_past_2_31(backend, _free_memory):
    g = torch.Generator().manual_seed(2)
    ta, batch = dense_batch(g)
    x, _ = dense_bf16(0)
    A = (torch.randn(SLOTS, RANK, DENSE_K, generator=g) / 256).to(BF16)
    S = lk.lora_shrink(x, A, batch, backend=backend)
    assert_close_to_ref(S[CHECK_ROWS], ref.multi_lora_shrink(x[CHECK_ROWS].double(), A.double(), ta[CHECK_ROWS]),
                        BF16, "S")
    y, x = x, None  # reuse the 4 GiB as the expand's output
    y0 = y[CHECK_ROWS].double()
    B = torch.randn(SLOTS, DENSE_K, RANK, generator=g).to(BF16)
    sc = torch.rand(SLOTS, generator=g)
    lk.lora_expand(S, B, batch, y, sc, backend=backend)
    expected = y0 + ref.multi_lora_expand_delta(S[CHECK_ROWS].double(), B.double(), sc, ta[CHECK_ROWS])
    assert_close_to_ref(y[CHECK_ROWS], expected, BF16, "expand y")


@pytest.mark.nightly
@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if b in BACKENDS])
def test_dense_lora_linear_output_past_2_31(backend, _free_memory):
    """y = [2^15 + 1, 2^16] bf16 from a narrow x: the output's last row starts at element 2^31."""
    g = torch.Generator().manual_seed(3)
    K = 16
    x = torch.randn(DENSE_T, K, generator=g).to(BF16)
    W = (torch.randn(DENSE_K, K, generator=g) / 4).to(BF16)
    b = torch.randn(DENSE_K, generator=g).to(BF16)
    A = (torch.randn(RANK, K, generator=g) / 4).to(BF16)
    B = torch.randn(DENSE_K, RANK, generator=g).to(BF16)
    with torch.no_grad():
        y = lk.lora_linear(x, W, b, A, B, 0.5, backend=backend)
    assert y.numel() > 2**31
    expected, _ = ref.lora_linear_forward(x[CHECK_ROWS].double(), W.double(), b.double(), A.double(), B.double(), 0.5)
    assert_close_to_ref(y[CHECK_ROWS], expected, BF16, "y")
