"""QLoRA: quantized bases as data (lora_kernels.quant), the reference dequantization against bitsandbytes, the
qlora_linear op (every backend, every gradient, torch.compile) and patch_peft on PEFT's Linear4bit /
Linear8bitLt / Conv1D layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import quant, reference
from lora_kernels.ops import qlora
from lora_kernels.ops.qlora import qlora_linear

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes: pip install 'lora_kernels[qlora]'")
F = pytest.importorskip("bitsandbytes.functional")

QUANT_DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.float16, torch.bfloat16)]
# Odd shapes: in % 64 != 0 (blocks cross rows), an odd number of values (a padding nibble), one value.
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in ((64, 128), (37, 90), (5, 7), (1, 1), (300, 65))]
BACKENDS = ["torch", "native", "bnb"]
# The backends and the float64 reference on the dequantized weight: float32 GEMMs of different summation order.
RTOL, ATOL = 1e-5, 1e-5


def quantized(shape, quant_type="nf4", nested=False, dtype=torch.float32, seed=0) -> quant.QuantWeight:
    torch.manual_seed(seed)
    W = torch.randn(shape, dtype=dtype)
    q, qs = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    return quant.from_bnb(bnb.nn.Params4bit(q, requires_grad=False, quant_state=qs, bnb_quantized=True,
                                            quant_type=quant_type)), q, qs


# ----------------------------------------------------------------------------------------------------
# The format and the reference dequantization, bit-exact with bitsandbytes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tables_equal_bitsandbytes(quant_type):
    assert torch.equal(reference.quant_table(quant_type), F.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact_with_bitsandbytes(quant_type, nested, shape, dtype):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    qw, q, qs = quantized(shape, quant_type, nested, dtype)
    want = F.dequantize_4bit(q, qs)
    if shape[1] % 64 and shape[1] % 2 == 0:
        # bitsandbytes 0.50's C++ CPU kernel misplaces the scales of blocks that cross rows (3x the error against
        # the original weight): its own PyTorch implementation (the CUDA layout) is the one to match.
        a = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
        want = _dequantize_4bit_compute(q.reshape(-1), a, F.get_4bit_type(quant_type, device="cpu"), 64, shape, dtype)
    assert qw.fmt == quant.QuantFormat(quant_type, shape, dtype, 64, nested) and hash(qw.fmt)
    assert torch.equal(qw.dequantize(), want)
    a = quant.resolve_absmax(qw.fmt, *qw.tensors()[1:])
    assert torch.equal(reference.dequantize_4bit(qw.codes, a, quant_type, shape, dtype), want)
    if qlora.HAS_NATIVE_QUANT and dtype == torch.float32:
        W = torch.ops.lora_kernels.native_quant4_dequantize(qw.codes, a, quant.table(quant_type, a.device), *shape)
        assert torch.equal(W, want)
    assert qw.codes.data_ptr() == q.data_ptr()  # shared, not copied


def test_dequantize_int8_row_bit_exact_with_bitsandbytes():
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(90, 37, has_fp16_weights=False).to("cpu")
    qw = quant.from_bnb(layer)
    assert qw.fmt.quant_type == "int8_row" and qw.codes.dtype == torch.int8
    want = F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    assert torch.equal(qw.dequantize(), want)
    layer(torch.randn(2, 90))  # bitsandbytes moves SCB to layer.state on the first call
    assert torch.equal(quant.from_bnb(layer).dequantize(), want)


# ----------------------------------------------------------------------------------------------------
# The op: every backend against the float64 reference on the dequantized weight, every gradient
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [0, 1, 5, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape,quant_type,nested", [
    pytest.param((96, 128), "nf4", False, id="nf4-96x128"),
    pytest.param((48, 130), "nf4", True, id="nf4n-48x130"),
    pytest.param((33, 64), "fp4", True, id="fp4n-33x64"),
])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "drop"])
def test_qlora_linear_matches_reference(backend, M, shape, quant_type, nested, dropout):
    qw, _, _ = quantized(shape, quant_type, nested)
    out_f, in_f = shape
    torch.manual_seed(1)
    x = torch.randn(M, in_f, requires_grad=True)
    A = torch.randn(4, in_f, requires_grad=True)
    B = torch.randn(out_f, 4, requires_grad=True)
    b = torch.randn(out_f)
    torch.manual_seed(7)
    y = qlora_linear(x, qw, b, A, B, 0.5, dropout, training=True, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    keep = None
    if dropout:
        torch.manual_seed(7)
        seed = lora_kernels.dropout.new_seed()
        keep = lora_kernels.dropout_mask(seed, (M, in_f), dropout)
    W = qw.dequantize().double()
    xd, Ad, Bd = (t.detach().double() for t in (x, A, B))
    y_ref, _ = reference.lora_linear_forward(xd, W, b.double(), Ad, Bd, 0.5, keep, dropout)
    grads_ref = reference.lora_linear_backward(g.double(), xd, W, Ad, Bd, 0.5, keep, dropout)
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)
    for name, got, want in zip(("dx", "dA", "dB"), (x.grad, A.grad, B.grad), grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL * max(1, M), msg=lambda m: f"{name}: {m}")


def test_int8_row_and_no_grad_paths():
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False).to("cpu")
    qw = quant.from_bnb(layer)
    x, A, B = torch.randn(3, 2, 64), torch.randn(4, 64), torch.randn(48, 4)
    W = qw.dequantize().double()
    want = (x.double() @ W.T + 0.5 * (x.double() @ A.double().T) @ B.double().T)
    for backend in BACKENDS + [None]:
        with torch.no_grad():
            y = qlora_linear(x, qw, None, A, B, 0.5, backend=backend)
        assert y.shape == (3, 2, 48)
        torch.testing.assert_close(y.double(), want, rtol=RTOL, atol=ATOL)


def test_native_fused_gemv_never_dequantizes(monkeypatch):
    if not qlora.HAS_NATIVE_QUANT:
        pytest.skip("the C++ extension lora_kernels._C is not built (pip install --no-build-isolation -e .)")
    qw, _, _ = quantized((4864 // 8, 896 // 2))
    calls = []
    monkeypatch.setattr(qlora, "_deq_native", lambda *a: calls.append(1))
    monkeypatch.setattr(qlora, "_deq_torch", lambda *a: calls.append(1))
    with torch.no_grad():
        y = qlora_linear(torch.randn(qlora.GEMV_MAX_M, 448), qw, None, torch.randn(4, 448), torch.randn(608, 4), 1.0,
                         backend="native")
    assert y.shape == (qlora.GEMV_MAX_M, 608) and not calls


def test_native_gemv_every_row_count_and_row_tail():
    """The vectorised GEMV (in % 64 == 0, M <= GEMV_MAX_M): every row count 1..9 (one template per count of x
    rows, and 9 = two passes) and out = 37 (W0 rows taken 4 at a time for M <= 2: a tail of 1), against the
    dequantized float64 product; a NaN in one row of x stays in that row."""
    if not qlora.HAS_NATIVE_QUANT:
        pytest.skip("the C++ extension lora_kernels._C is not built (pip install --no-build-isolation -e .)")
    qw, _, _ = quantized((37, 192), "nf4", nested=True)
    fmt, (codes, absmax, n_absmax, n_code, n_offset) = qw.fmt, qw.tensors()
    a = qlora._absmax_native(fmt, absmax, n_absmax, n_code, n_offset)
    W = qw.dequantize().double()
    torch.manual_seed(1)
    table = quant.table("nf4", torch.device("cpu"))
    for M, cap in [(m, 8) for m in range(1, 10)] + [(20, 20), (20, 19)]:  # 20 rows: GEMV (3 passes) or blocked
        x = torch.randn(M, 192)
        y = torch.ops.lora_kernels.native_quant4_linear(x, codes, a, table, None, 37, cap)
        torch.testing.assert_close(y.double(), x.double() @ W.T, rtol=1e-5, atol=1e-5, msg=lambda m: f"M={M}: {m}")
        x[M - 1, 100] = float("nan")
        y = torch.ops.lora_kernels.native_quant4_linear(x, codes, a, table, None, 37, cap)
        assert y[M - 1].isnan().all() and not y[:M - 1].isnan().any()
    with pytest.raises(RuntimeError, match="gemv_max_m must be >= 0"):
        torch.ops.lora_kernels.native_quant4_linear(x, codes, a, table, None, 37, -1)


def test_resolved_absmax_is_kept_per_weight_until_it_changes_or_dies():
    """The native path resolves a double-quantized absmax once per weight (not per call), recomputes it after an
    in-place change of the nested statistics, and forgets it when the weight is freed."""
    if not qlora.HAS_NATIVE_QUANT:
        pytest.skip("the C++ extension lora_kernels._C is not built (pip install --no-build-isolation -e .)")
    import gc
    qw, *made = quantized((40, 128), "nf4", nested=True)
    fmt, (codes, absmax, n_absmax, n_code, n_offset) = qw.fmt, qw.tensors()
    a = qlora._absmax_native(fmt, absmax, n_absmax, n_code, n_offset)
    assert torch.equal(a, quant.resolve_absmax(fmt, absmax, n_absmax, n_code, n_offset))
    assert qlora._absmax_native(fmt, absmax, n_absmax, n_code, n_offset) is a
    with torch.no_grad():
        n_absmax.mul_(2)  # the version counter: resolved again
    b = qlora._absmax_native(fmt, absmax, n_absmax, n_code, n_offset)
    assert b is not a and torch.equal(b, quant.resolve_absmax(fmt, absmax, n_absmax, n_code, n_offset))
    x = torch.randn(3, 128)
    y = qlora_linear(x, qw, None, torch.zeros(1, 128), torch.zeros(40, 1), 1.0, backend="native")
    torch.testing.assert_close(y.double(), x.double() @ qw.dequantize().double().T, rtol=1e-5, atol=1e-5)
    owner = id(absmax if absmax._base is None else absmax._base)
    assert owner in qlora._RESOLVED_ABSMAX
    del qw, made, absmax, a, b, codes, n_absmax, n_code, n_offset
    gc.collect()
    assert owner not in qlora._RESOLVED_ABSMAX


def test_gemv_cap_is_measured_once_or_taken_from_the_environment(monkeypatch):
    """Above GEMV_MAX_M rows the native forward runs the GEMV or the blocked GEMM as measured on this machine
    (both exact: the values agree to float32 rounding either way); LORA_KERNELS_QUANT4_GEMV_MAX_M overrides it."""
    if not qlora.HAS_NATIVE_QUANT:
        pytest.skip("the C++ extension lora_kernels._C is not built (pip install --no-build-isolation -e .)")
    monkeypatch.delenv("LORA_KERNELS_QUANT4_GEMV_MAX_M", raising=False)
    cap = qlora.gemv_max_m()
    assert cap in (qlora.GEMV_MAX_M, *qlora.GEMV_CAP_STEPS) and qlora.gemv_max_m() == cap
    qw, _, _ = quantized((40, 128), "nf4", nested=True)
    x = torch.randn(30, 128)
    want = x.double() @ qw.dequantize().double().T
    seen = []
    op = torch.ops.lora_kernels.native_quant4_linear.default
    monkeypatch.setattr(torch.ops.lora_kernels.native_quant4_linear, "default",
                        lambda *a: seen.append(a[-1]) or op(*a))
    for env in ("8", "64"):
        monkeypatch.setenv("LORA_KERNELS_QUANT4_GEMV_MAX_M", env)
        with torch.no_grad():
            y = qlora_linear(x, qw, None, torch.zeros(1, 128), torch.zeros(40, 1), 1.0, backend="native")
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert seen == [8, 64]


@pytest.mark.parametrize("M", [0, 3, 40], ids=lambda m: f"M{m}")
def test_native_blocked_ops_match_reference(M):
    """The C++ row-blocked paths (M > GEMV_MAX_M) over several 1 MB blocks of W0 whose starts fall inside a
    64-value absmax block (in = 999: blocks cross rows, an odd value count), the dx op, and the nested absmax
    op bit-exact with the reference; NaN in x propagates."""
    if not qlora.HAS_NATIVE_QUANT:
        pytest.skip("the C++ extension lora_kernels._C is not built (pip install --no-build-isolation -e .)")
    shape = (701, 999)  # 262 rows a block: blocks start at flat 261738 = 64·4089 + 42, ...
    qw, _, _ = quantized(shape, "nf4", nested=True)
    fmt, (codes, absmax, n_absmax, n_code, n_offset) = qw.fmt, qw.tensors()
    a = qlora._absmax_native(fmt, absmax, n_absmax, n_code, n_offset)
    assert torch.equal(a, quant.resolve_absmax(fmt, absmax, n_absmax, n_code, n_offset))
    table = quant.table("nf4", a.device)
    W = qw.dequantize().double()
    torch.manual_seed(0)
    x, g = torch.randn(M, shape[1]), torch.randn(M, shape[0])
    y = torch.ops.lora_kernels.native_quant4_linear(x, codes, a, table, None, shape[0])
    dx = torch.ops.lora_kernels.native_quant4_linear_dx(g, codes, a, table, shape[1])
    assert y.shape == (M, shape[0]) and dx.shape == (M, shape[1])
    torch.testing.assert_close(y.double(), x.double() @ W.T, rtol=RTOL, atol=ATOL * 10)
    torch.testing.assert_close(dx.double(), g.double() @ W, rtol=RTOL, atol=ATOL * 10)
    if M:
        x[M // 2, 5] = float("nan")
        y = torch.ops.lora_kernels.native_quant4_linear(x, codes, a, table, None, shape[0])
        assert y[M // 2].isnan().all() and not y[M // 2 - 1].isnan().any()
    with pytest.raises(RuntimeError, match="absmax must be"):
        torch.ops.lora_kernels.native_quant4_linear_dx(g, codes, a[:-1], table, shape[1])
    if M == 40:  # the "native" backend's forward and dx never build a dense W0 for float32
        def no_dense(*args):
            raise AssertionError("dense dequantize called")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qlora, "_deq_native", no_dense)
            mp.setattr(qlora, "_deq_torch", no_dense)
            xg = torch.randn(M, shape[1], requires_grad=True)
            A, B = torch.randn(4, shape[1], requires_grad=True), torch.randn(shape[0], 4, requires_grad=True)
            qlora_linear(xg, qw, None, A, B, 0.5, 0.1, training=True, backend="native").backward(g)
        assert xg.grad.isfinite().all() and A.grad.isfinite().all() and B.grad.isfinite().all()
    if M == 3:  # schemas and fakes of the ops the native backend calls
        ops, utils = torch.ops.lora_kernels, ("test_schema", "test_faketensor")
        torch.library.opcheck(ops.native_quant4_linear_dx.default, (g, codes, a, table, shape[1]), test_utils=utils)
        torch.library.opcheck(ops.native_quant4_linear.default, (x, codes, a, table, None, shape[0]), test_utils=utils)
        torch.library.opcheck(ops.native_quant4_absmax.default, (absmax, n_absmax, n_code.float(),
                                                                 n_offset.float().reshape(1), fmt.nested_blocksize),
                              test_utils=utils)


def test_compile_fullgraph_through_registered_ops():
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def rec(gm, _):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    qw, _, _ = quantized((40, 96), "nf4", True)
    A = torch.randn(4, 96, requires_grad=True)
    B = torch.randn(40, 4, requires_grad=True)
    x = torch.randn(6, 96, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda x, A, B: qlora_linear(x, qw, None, A, B, 0.5, backend="torch"), fullgraph=True,
                      backend=aot_autograd(fw_compiler=rec, bw_compiler=rec))
    y = f(x, A, B)
    y.sum().backward()
    y_ref = qlora_linear(x.detach(), qw, None, A.detach(), B.detach(), 0.5, backend="torch")
    torch.testing.assert_close(y, y_ref)
    assert any("qlora_linear_fwd" in t for t in graphs[0]) and any("qlora_linear_bwd" in t for t in graphs[1])
    torch._dynamo.reset()


def test_opcheck():
    qw, _, _ = quantized((24, 70), "fp4", True)
    args = (torch.randn(3, 70), qw.codes, None, torch.randn(2, 70), torch.randn(24, 2), 0.5, 0.0, None,
            *qw.tensors()[1:], *qw.fmt.op_args(), "torch")
    torch.library.opcheck(qlora.qlora_linear_fwd, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,match", [
    (dict(absmax=torch.zeros(3)), "qweight.absmax must be"),
    (dict(nested_code=torch.zeros(16)), "qweight.nested_code"),
    (dict(fmt=quant.QuantFormat("nf5", (24, 70), nested=True)), "unknown quant_type"),
    (dict(fmt=quant.QuantFormat("nf4", (24, 70), blocksize=128, nested=True)), "blocksize must be 64"),
    (dict(codes=torch.zeros(5, dtype=torch.uint8)), "qweight.codes must be"),
])
def test_bad_inputs_raise_naming_the_argument(bad, match, monkeypatch):
    qw, _, _ = quantized((24, 70), "nf4", True)
    called = []
    for name in BACKENDS:
        monkeypatch.setitem(qlora.IMPLS, name, (lambda *a: called.append(1), lambda *a: called.append(1)))
    with pytest.raises((ValueError, TypeError), match=match):
        qlora_linear(torch.randn(2, 70), qw._replace(**bad), None, torch.randn(2, 70), torch.randn(24, 2), 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        qlora_linear(torch.randn(2, 71), qw, None, torch.randn(2, 70), torch.randn(24, 2), 1.0)
    with pytest.raises(TypeError, match="qweight must be"):
        qlora_linear(torch.randn(2, 70), qw.dequantize(), None, torch.randn(2, 70), torch.randn(24, 2), 1.0)
    for bias, match in ((torch.zeros(24, dtype=torch.float16), "bias dtype torch.float16 must equal x dtype"),
                        (torch.zeros(23), r"bias must be None or have shape \[out=24\]")):
        with pytest.raises((ValueError, TypeError), match=match):
            qlora_linear(torch.randn(2, 70), qw, bias, torch.randn(2, 70), torch.randn(24, 2), 1.0)
    assert not called


# ----------------------------------------------------------------------------------------------------
# Measured dispatch: "bnb" is one more candidate, verified and timed like the others
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """LORA_KERNELS_TUNE=1 with a fresh cache folder and dispatch state (as tests/test_dispatch.py)."""
    from lora_kernels import dispatch
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_KERNELS_TUNE", "1")
    dispatch.reset()
    yield dispatch
    dispatch.reset()


def qlora_entries(dispatch) -> dict:
    return {k.split("/")[1]: e for k, e in dispatch.entries("cpu").items() if k.startswith("qlora_linear/")}


def test_bnb_candidate_is_verified_and_timed_when_tuning(tuned):
    qw, _, _ = quantized((48, 128), "nf4", True)  # in % 64 == 0: bitsandbytes' own kernels run
    torch.manual_seed(1)
    x = torch.randn(6, 128, requires_grad=True)
    A, B = torch.randn(4, 128, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    y = qlora_linear(x, qw, None, A, B, 0.5, 0.1, training=True)
    y.sum().backward()
    got = qlora_entries(tuned)
    assert set(got) == {"fwd", "bwd"}
    for phase, e in got.items():
        assert "bnb" in e["ms"] and "bnb" not in e["rejected"], (phase, e)
        assert {"torch", "native"} <= set(e["ms"]) if qlora.HAS_NATIVE_QUANT else "torch" in e["ms"]


def test_wrong_bnb_candidate_is_rejected(tuned, monkeypatch):
    fwd, bwd = qlora.IMPLS["bnb"]

    def garbage(*args):
        y, S = fwd(*args)
        return y * 2 + 1, S

    monkeypatch.setitem(qlora.IMPLS, "bnb", (garbage, bwd))
    qw, _, _ = quantized((48, 128), "nf4", False)
    x, A, B = torch.randn(6, 128), torch.randn(4, 128), torch.randn(48, 4)
    with pytest.warns(RuntimeWarning, match=r"dropped candidate 'bnb'.*qlora_linear/fwd"):
        with torch.no_grad():
            y = qlora_linear(x, qw, None, A, B, 0.5)
    torch.testing.assert_close(y, qlora_linear(x, qw, None, A, B, 0.5, backend="torch"), rtol=RTOL, atol=ATOL)
    e = qlora_entries(tuned)["fwd"]
    assert e["choice"] != "bnb" and "differs from the reference" in e["rejected"]["bnb"]


def test_untuned_cpu_never_runs_bnb(monkeypatch, tmp_path):
    from lora_kernels import dispatch
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORA_KERNELS_TUNE", raising=False)
    dispatch.reset()
    monkeypatch.setitem(qlora.IMPLS, "bnb", (lambda *a: pytest.fail("bnb ran untuned"),) * 2)
    qw, _, _ = quantized((48, 128))
    with torch.no_grad():
        qlora_linear(torch.randn(3, 128), qw, None, torch.randn(4, 128), torch.randn(48, 4), 0.5)
    dispatch.reset()


# ----------------------------------------------------------------------------------------------------
# lora_linear and LoRALinear over a quantized base
# ----------------------------------------------------------------------------------------------------

def test_lora_linear_takes_a_quant_weight(monkeypatch):
    qw, _, _ = quantized((40, 96), "nf4", True)
    torch.manual_seed(1)
    x, A, B, b = torch.randn(2, 3, 96), torch.randn(4, 96), torch.randn(40, 4), torch.randn(40)
    calls = []
    real = qlora.qlora_linear
    monkeypatch.setattr(qlora, "qlora_linear", lambda *a: calls.append(a) or real(*a))
    for backend in BACKENDS + [None]:
        y = lora_kernels.lora_linear(x, qw, b, A, B, 0.5, backend=backend)
        want = lora_kernels.lora_linear(x, qw.dequantize(), b, A, B, 0.5, backend="torch")
        torch.testing.assert_close(y, want, rtol=RTOL, atol=ATOL)
    assert len(calls) == len(BACKENDS) + 1 and calls[0][1] is qw
    with pytest.raises(ValueError, match="qweight.absmax must be"):
        lora_kernels.lora_linear(x, qw._replace(absmax=torch.zeros(3)), b, A, B, 0.5)


def bnb_linear(kind: str, in_f=128, out_f=72, bias=True, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "drop"])
def test_lora_linear_layer_over_a_bnb_base(kind, dropout):
    """LoRALinear(bnb layer) against LoRALinear(nn.Linear holding the dequantized weight): forward and grads."""
    base = bnb_linear(kind)
    layer = lora_kernels.LoRALinear(base, r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights="gaussian")
    assert layer.quant_kind == kind and layer.lora_A["default"].weight.dtype == torch.float32
    dense = nn.Linear(128, 72)
    dense.weight = nn.Parameter(quant.from_bnb(base).dequantize(torch.float32))
    dense.bias = nn.Parameter(base.bias.data.clone())
    twin = lora_kernels.LoRALinear(dense, r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 (PEFT's init) would leave dA zero
        for n in ("lora_A", "lora_B"):
            getattr(twin, n)["default"].weight.copy_(getattr(layer, n)["default"].weight)
    outs = []
    for m in (layer, twin):
        m.train()
        x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad))
    for name, got, want in zip(("y", "dx", "dA", "dB"), *outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert "base=" + kind in repr(layer)
    with pytest.raises(NotImplementedError, match="merge/unmerge on a bitsandbytes"):
        layer.merge()


def test_a_weight_bitsandbytes_repacked_is_refused_everywhere():
    """bitsandbytes' eval forward on an AVX512-BF16 CPU repacks a 4-bit weight in place (another byte layout):
    reading it as the standard one would be silently wrong, so every reader refuses it -- `quant.from_bnb`, and
    through it LoRALinear, MultiLoRALinear and patch_peft (the flag set by hand: any CPU)."""
    layer = bnb_linear("4bit")
    layer.weight.quant_state.packing_format_for_cpu = True
    assert quant.bnb_repacked(layer)
    with pytest.raises(ValueError, match="repacked this 4-bit weight"):
        quant.from_bnb(layer)
    with pytest.raises(ValueError, match="repacked this 4-bit weight"):
        lora_kernels.LoRALinear(layer, r=2)(torch.randn(3, 128))
    with pytest.raises(ValueError, match="repacked this 4-bit weight"):
        lora_kernels.MultiLoRALinear(layer, max_loras=2, max_rank=2)


def test_lora_linear_layer_caches_the_converted_weight_until_it_changes(monkeypatch):
    base = bnb_linear("4bit")
    layer = lora_kernels.LoRALinear(base, r=4)
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
    conversions = []
    real = quant.from_bnb
    monkeypatch.setattr(quant, "from_bnb", lambda *a, **k: conversions.append(1) or real(*a, **k))
    with torch.no_grad():
        y0 = layer(x)
        layer(x)
        assert not conversions  # cached
        new = bnb_linear("4bit", seed=5)  # a new weight object (as PEFT's merge / unmerge make)
        base.weight = new.weight
        y1 = layer(x)
    assert len(conversions) == 1 and not torch.equal(y0, y1)
    with pytest.raises(ValueError, match="not quantized yet"):  # never moved to its device
        lora_kernels.LoRALinear(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32), r=4)


# ----------------------------------------------------------------------------------------------------
# patch_peft on PEFT's Linear4bit / Linear8bitLt / Conv1D layers
# ----------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class Quantizable(nn.Module):
    """Two linears with biases (q, v) and one without (o): the targets."""

    def __init__(self, d=128, h=192):  # in % 64 == 0: bitsandbytes' CPU kernels are right there (see above)
        super().__init__()
        self.q = nn.Linear(d, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.v(torch.relu(self.q(x)))))


def quantize_model(model: nn.Module, kind: str, nested=True) -> nn.Module:
    """Every nn.Linear replaced by a bitsandbytes layer holding the same weight, quantized on the CPU."""
    for name, m in list(model.named_children()):
        if type(m) is not nn.Linear:
            continue
        if kind == "4bit":
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
            new.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=nested)
        else:
            new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(m.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
        setattr(model, name, new.to("cpu"))
    setattr(model, f"is_loaded_in_{kind}", True)  # what PEFT reads to create its bitsandbytes LoRA layers
    return model


def dense_twin(model: nn.Module, cfg, patch: bool = True) -> nn.Module:
    """The same PEFT model over plain nn.Linear bases holding the dequantized weights (patched: the fused op;
    patch=False: PEFT's own layers)."""
    from peft import get_peft_model
    dense = Quantizable()
    for name, lin in dense.named_children():
        base = getattr(model.base_model.model, name).base_layer
        lin.weight = nn.Parameter(quant.from_bnb(base).dequantize(torch.float32))
        if base.bias is not None:
            lin.bias = nn.Parameter(base.bias.data.float().clone())
    twin = get_peft_model(dense, copy.deepcopy(cfg))
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert not twin.load_state_dict(lora, strict=False).unexpected_keys
    if patch:
        lora_kernels.patch_peft(twin)
    return twin


def rel_rms(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def run(model, x, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    (y.square().mean()).backward()
    return y.detach(), lora_grads(model)


def qlora_pair(kind, dropout=0.0, nested=True):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = quantize_model(Quantizable(), kind, nested)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q", "v", "o"], init_lora_weights=False)
    ref = get_peft_model(base, cfg)
    model = copy.deepcopy(ref)
    report = lora_kernels.patch_peft(model)
    return model, ref, report, cfg


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop"])
def test_patched_quantized_peft_model_matches_dense_twin_and_peft(kind, dropout):
    model, ref, report, cfg = qlora_pair(kind, dropout)
    assert report.num_patched == 3 and not report.skipped, report
    names = {type(m).__name__ for m in model.modules()}
    assert {"FusedLinear4bit" if kind == "4bit" else "FusedLinear8bitLt"} <= names
    twin = dense_twin(model, cfg)  # patched too: the same dropout seeds, dense bases
    model.train(), twin.train(), ref.train()
    x = torch.randn(2, 7, 128)
    y, grads = run(model, x)
    y_twin, grads_twin = run(twin, x)
    torch.testing.assert_close(y, y_twin, rtol=RTOL, atol=ATOL)
    assert grads.keys() == grads_twin.keys() and len(grads) == 6
    for n in grads:
        torch.testing.assert_close(grads[n], grads_twin[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    if dropout:
        return  # PEFT draws its own dropout masks; the dense twin above shares ours
    y_ref, grads_ref = run(ref, x)
    # bitsandbytes' own CPU base is not the float32 x deq(W0)ᵀ: its 4-bit GEMM runs in reduced precision (rel.
    # error ~3e-3), its 8-bit one quantizes the activations to int8 (~1e-2). Relative RMS error within twice that.
    bound = 2e-2 if kind == "8bit" else 6e-3
    assert rel_rms(y, y_ref) < bound
    for n in grads:
        assert rel_rms(grads[n], grads_ref[n]) < 2 * bound, n


def test_lora_linear_from_a_peft_4bit_layer():
    model, ref, _, _ = qlora_pair("4bit")
    layer = lora_kernels.LoRALinear.from_peft(ref.base_model.model.q)
    assert layer.quant_kind == "4bit"
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model.base_model.model.q(x), rtol=RTOL, atol=ATOL)


def test_unpatch_and_merge_behave_as_peft():
    model, ref, _, _ = qlora_pair("4bit")
    x = torch.randn(3, 128)
    model.eval(), ref.eval()
    with torch.no_grad():
        for m in (model, ref):  # PEFT's merge: dequantize, add, requantize (with its rounding and warning)
            with pytest.warns(UserWarning):
                m.base_model.model.q.merge()
                m.base_model.model.q.unmerge()
        assert rel_rms(model(x), ref(x)) < 6e-3  # the bnb base's own precision (see above)
    assert lora_kernels.unpatch_peft(model) == 3
    assert type(model.base_model.model.q) is peft.tuners.lora.Linear4bit


def test_conv1d_fan_in_fan_out_is_patched_and_matches_peft():
    from peft import LoraConfig, get_peft_model
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    ref = get_peft_model(transformers.GPT2LMHeadModel(cfg),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                    init_lora_weights=False))
    ref.eval()  # GPT-2's own dropouts off: the same forward twice
    model = copy.deepcopy(ref)
    report = lora_kernels.patch_peft(model)
    assert report.num_patched == 6 and not report.skipped, report  # c_attn, attn.c_proj, mlp.c_proj per block
    ids = torch.randint(0, 128, (2, 9))
    outs = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), lora_grads(m)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for n, g in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_compile_fullgraph_patched_4bit_layer():
    from torch._dynamo.backends.common import aot_autograd
    model, _, _, _ = qlora_pair("4bit")
    layer = model.base_model.model.v
    x = torch.randn(4, 192)
    want = layer(x)
    torch._dynamo.reset()
    f = torch.compile(layer, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, _: gm))
    torch.testing.assert_close(f(x), want)
    torch._dynamo.reset()


def test_trainer_gradient_checkpointing_losses_equal_unpatched(tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)

    def make():
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg)
        for layer in m.model.layers:
            quantize_model(layer.self_attn, "4bit")
            quantize_model(layer.mlp, "4bit")
        m.is_loaded_in_4bit = True
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
        return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))

    torch.manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 16))]
    losses = []
    for patched in (False, True):
        model = make()
        if patched:
            assert lora_kernels.patch_peft(model).num_patched == 6
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=4,
                                              max_steps=4, learning_rate=1e-2, logging_steps=1, report_to=[],
                                              gradient_checkpointing=True, use_cpu=True, save_strategy="no",
                                              seed=0, data_seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4
    # bitsandbytes' base vs ours (float32): the bnb CPU path may run in bf16 (see the module docstring).
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
