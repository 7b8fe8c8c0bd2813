"""The fused single-adapter LoRA linear: reference, every backend vs. the reference, dropout, errors,
LoRALinear vs. PEFT, torch.compile."""
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.dropout import new_seed
from lora_kernels.kernels import lora_linear as klk

from conftest import assert_close_to_ref, cuda_param, require_backend

F64 = torch.float64


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every Triton output buffer starts as NaN, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(klk, "POISON_OUTPUTS", True)


def make_inputs(M, K, N, R, dtype, lora_dtype=None, device="cpu", bias=True, lead=(), x_noncontig=False):
    lora_dtype = lora_dtype or dtype
    g = torch.Generator().manual_seed(1000 * M + 10 * K + N + R)
    rnd = lambda *s: torch.randn(*s, generator=g)
    if x_noncontig:  # a column slice of a wider tensor: row stride != K
        x = rnd(*lead, M, K + 7).to(device, dtype)[..., 3:K + 3]
    else:
        x = rnd(*lead, M, K).to(device, dtype)
    assert x.is_contiguous() != x_noncontig
    W = (rnd(N, K) / math.sqrt(K)).to(device, dtype)
    b = rnd(N).to(device, dtype) if bias else None
    A = (rnd(R, K) / math.sqrt(K)).to(device, lora_dtype)
    B = rnd(N, R).to(device, lora_dtype)  # non-zero: the LoRA path must show in every output
    dy = rnd(*lead, M, N).to(device, dtype)
    return x, W, b, A, B, dy


def run_op(backend, x, W, b, A, B, dy, scaling, dropout_p, need=(True, True, True)):
    """Forward + backward through lk.lora_linear; returns (y, dx, dA, dB, seed) (grads None when not needed)."""
    x = x.detach().requires_grad_(need[0])
    A = A.detach().requires_grad_(need[1])
    B = B.detach().requires_grad_(need[2])
    training = dropout_p > 0
    state = torch.random.get_rng_state()
    y = lk.lora_linear(x, W, b, A, B, scaling, dropout_p=dropout_p, training=training, backend=backend)
    seed = None
    if training:  # the op drew its seed from the default generator: draw the same one again
        after = torch.random.get_rng_state()
        torch.random.set_rng_state(state)
        seed = new_seed()
        torch.random.set_rng_state(after)
    if any(need):
        y.backward(dy)
    return y, x.grad, A.grad, B.grad, seed


def reference_outputs(x, W, b, A, B, dy, scaling, dropout_p, seed):
    M, K = x.reshape(-1, x.shape[-1]).shape
    mask = lk.dropout_mask(seed, (M, K), dropout_p) if seed is not None else None
    x2, dy2 = x.reshape(M, K).to(F64).cpu(), dy.reshape(M, dy.shape[-1]).to(F64).cpu()
    args = [t.to(F64).cpu() for t in (W, A, B)]
    y, _ = reference.lora_linear_forward(x2, args[0], None if b is None else b.to(F64).cpu(), args[1], args[2],
                                         scaling, mask, dropout_p)
    dx, dA, dB = reference.lora_linear_backward(dy2, x2, *args, scaling, mask, dropout_p)
    return y, dx, dA, dB


def check_backend(backend, device, M, K, N, R, dtype, lora_dtype=None, dropout_p=0.0, bias=True, lead=(),
                  x_noncontig=False, need=(True, True, True), scaling=0.75):
    require_backend(backend, device)
    x, W, b, A, B, dy = make_inputs(M, K, N, R, dtype, lora_dtype, device, bias, lead, x_noncontig)
    y, dx, dA, dB, seed = run_op(backend, x, W, b, A, B, dy, scaling, dropout_p, need)
    y_ref, dx_ref, dA_ref, dB_ref = reference_outputs(x, W, b, A, B, dy, scaling, dropout_p, seed)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    assert_close_to_ref(y.reshape(-1, N), y_ref, dtype, "y")
    for name, got, ref, want, t in (("dx", dx, dx_ref, need[0], x), ("dA", dA, dA_ref, need[1], A),
                                    ("dB", dB, dB_ref, need[2], B)):
        if not want:
            assert got is None, f"{name} computed although not required"
            continue
        assert got.dtype == t.dtype, f"{name} dtype {got.dtype} != {t.dtype}"
        assert_close_to_ref(got.reshape(ref.shape), ref, dtype, name)


# ---------------------------------------------------------------------------------------------------
# The reference itself vs. autograd through a naive float64 composition
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_reference_matches_autograd(bias, dropout_p):
    x, W, b, A, B, dy = make_inputs(9, 13, 11, 5, F64, bias=bias)
    mask = torch.rand(9, 13, generator=torch.Generator().manual_seed(0)) >= dropout_p if dropout_p else None
    xr, Ar, Br = (t.clone().requires_grad_() for t in (x, A, B))
    x_hat = xr * mask / (1 - dropout_p) if mask is not None else xr
    y_naive = nn.functional.linear(xr, W, b) + 0.5 * nn.functional.linear(nn.functional.linear(x_hat, Ar), Br)
    y_naive.backward(dy)
    y, S = reference.lora_linear_forward(x, W, b, A, B, 0.5, mask, dropout_p)
    dx, dA, dB = reference.lora_linear_backward(dy, x, W, A, B, 0.5, mask, dropout_p)
    torch.testing.assert_close(y, y_naive.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, (x_hat @ Ar.T).detach(), rtol=1e-12, atol=1e-12)
    for got, want in ((dx, xr.grad), (dA, Ar.grad), (dB, Br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Every backend vs. the reference
# ---------------------------------------------------------------------------------------------------

BACKENDS = ["torch", "triton", "native"]
DEVICES = ["cpu", cuda_param()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
dtype_id = lambda d: str(d).replace("torch.", "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lora_fp32", [False, True], ids=["lora=x", "lora=fp32"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_dtypes(device, backend, dtype, lora_fp32, dropout_p):
    if lora_fp32 and dtype == torch.float32:
        pytest.skip("float32 adapters with float32 activations: the lora=x case of this test, already run")
    check_backend(backend, device, 37, 50, 70, 6, dtype, torch.float32 if lora_fp32 else None, dropout_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 8, 16, 40, 64, 128])
def test_ranks(device, backend, rank):
    # rank 128 takes two 64-wide chunks in every kernel; 40 is no multiple of 16.
    check_backend(backend, device, 21, 33, 29, rank, torch.float32, dropout_p=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N", [(1, 17, 9), (16, 64, 48), (67, 130, 93), (200, 70, 40)],
                         ids=["M1", "M16", "M67-odd", "M200"])
def test_shapes(device, backend, M, K, N):
    # M=1/16 take the decode config (split-K shrink); M=200 > 64 the large GEMM config and split-M dA.
    check_backend(backend, device, M, K, N, 7, torch.bfloat16, torch.float32, dropout_p=0.15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(device, backend):
    check_backend(backend, device, 0, 24, 16, 4, torch.float32, dropout_p=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_noncontiguous_nobias(device, backend):
    check_backend(backend, device, 5, 40, 24, 3, torch.float16, lead=(2, 3), x_noncontig=True, bias=False,
                  dropout_p=0.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["dx", "dA", "dB", "dA+dB"])
def test_partial_grads(device, backend, need):
    check_backend(backend, device, 19, 24, 20, 5, torch.float32, dropout_p=0.1, need=need)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_output_grad(device, backend):
    """y.sum().backward() hands the op a stride-0 (expanded) dy."""
    require_backend(backend, device)
    x, W, b, A, B, _ = make_inputs(9, 20, 12, 3, torch.float32, device=device)
    A.requires_grad_()
    B.requires_grad_()
    lk.lora_linear(x, W, b, A, B, 0.5, backend=backend).sum().backward()
    _, _, dA, dB = reference_outputs(x, W, b, A, B, torch.ones(9, 12), 0.5, 0.0, None)
    assert_close_to_ref(A.grad, dA, torch.float32, "dA")
    assert_close_to_ref(B.grad, dB, torch.float32, "dB")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_multi_block(device, monkeypatch):
    """Small tiles so every kernel runs many programs: grouped GEMM order, split-K / split-M atomics,
    the staggered dB walk and several rank chunks."""
    small = (16, 16, 16, 2, 4, 2)
    monkeypatch.setattr(klk, "_GEMM_CONFIGS", {k: small for k in klk._GEMM_CONFIGS})
    monkeypatch.setattr(klk, "_TARGET_PROGRAMS", 64)
    assert klk.shrink_split_k(3, 300, 70, 2) > 1 and klk.da_split_m(150, 300, 70, 2) > 1
    check_backend("triton", device, 3, 300, 75, 70, torch.float16, torch.float32, dropout_p=0.2)
    check_backend("triton", device, 150, 300, 75, 70, torch.bfloat16, dropout_p=0.2)


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------

def test_dropout_mask_statistics_and_determinism():
    seed = new_seed()
    for p in (0.1, 0.5):
        m = lk.dropout_mask(seed, (400, 1000), p)
        kept = m.double().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / m.numel()), kept
        assert torch.equal(m, lk.dropout_mask(seed, (400, 1000), p))
    assert not torch.equal(lk.dropout_mask(seed, (50, 50), 0.5), lk.dropout_mask(seed + 1, (50, 50), 0.5))
    # the row length is part of each element's offset: rows are not repeats of each other
    m = lk.dropout_mask(seed, (64, 64), 0.5)
    assert not torch.equal(m[0], m[1])


def test_dropout_seed_follows_manual_seed():
    x, W, b, A, B, _ = make_inputs(8, 16, 12, 4, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(lk.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=True, backend="torch"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    other = lk.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=True, backend="torch")
    assert not torch.equal(other, outs[0])
    # not training: no dropout at all
    y_eval = lk.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=False, backend="torch")
    y_ref, _ = reference.lora_linear_forward(x, W, b, A, B, 1.0)
    torch.testing.assert_close(y_eval, y_ref.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_mask_is_the_regenerated_mask(device, backend):
    """With x = 1 and A = I, S = x̂ Aᵀ is the mask itself / (1-p): bit-exact check of the in-kernel mask."""
    require_backend(backend, device)
    M, K, p = 45, 40, 0.3
    x = torch.ones(M, K, device=device)
    A = torch.eye(K, device=device)
    seed = new_seed()
    _, S = torch.ops.lora_kernels.lora_linear_fwd(x, torch.zeros(3, K, device=device), None, A,
                                                  torch.zeros(3, K, device=device), 1.0, p, seed, backend)
    expected = lk.dropout_mask(seed, (M, K), p).to(torch.float32) / (1 - p)
    torch.testing.assert_close(S.cpu(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                              (torch.float16, None), (F64, None)], ids=dtype_id)
def test_torch_backend_dropout_without_the_extension(dtype, lora_dtype, monkeypatch):
    """The "torch" backend's pure-PyTorch dropout (x̂ = x ⊙ m / (1 - p) in the forward and dA, dx's dropped
    term added in place), which a built extension replaces on CPU: y and every gradient against the reference."""
    from lora_kernels.ops import plumbing
    calls = []

    def native_dropout_ok(t):
        calls.append(tuple(t.shape))
        return False
    monkeypatch.setattr(plumbing, "native_dropout_ok", native_dropout_ok)
    check_backend("torch", "cpu", 23, 37, 19, 5, dtype, lora_dtype, dropout_p=0.3)
    assert len(calls) >= 3, "forward x̂, backward x̂ and dx's dropped term must each ask native_dropout_ok"


def test_backward_saves_only_S_and_seed():
    """Saved for backward: x, the weights, S [M, r] and the seed -- no mask, no x̂."""
    x, W, b, A, B, _ = make_inputs(12, 16, 8, 4, torch.float32)
    x.requires_grad_()
    A.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lk.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=True, backend="torch")
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(12, 16), (8, 16), (4, 16), (8, 4), (12, 4), (1,)]), shapes


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors before any kernel runs
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    require_backend(backend, "cpu")
    x, W, b, A, B, _ = make_inputs(4, 8, 6, 2, torch.float32)
    call = lambda **kw: lk.lora_linear(**{**dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, scaling=1.0,
                                                 backend=backend), **kw})
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., in=8\]"):
        call(x=torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, in=8\]"):
        call(lora_A=torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"lora_B must have shape \[out=6, r=2\]"):
        call(lora_B=torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"bias must be None or have shape \[out=6\]"):
        call(bias=torch.randn(5))
    with pytest.raises(ValueError, match="weight must have shape"):
        call(weight=torch.randn(6, 8, 1))
    with pytest.raises(ValueError, match="one device"):
        call(lora_A=A.to("meta"))
    with pytest.raises(TypeError, match="weight dtype"):
        call(weight=W.double())
    with pytest.raises(TypeError, match="one dtype"):
        call(lora_B=B.double())
    with pytest.raises(TypeError, match="floating-point"):
        call(x=torch.ones(4, 8, dtype=torch.int64))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            call(dropout_p=p)
    with pytest.raises(ValueError, match="scaling must be a finite float"):
        call(scaling=float("nan"))
    if backend == "triton":
        with pytest.raises(TypeError, match="supports x of dtype"):
            lk.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0, backend="triton")
        with pytest.raises(TypeError, match="lora_A/lora_B in x's dtype"):
            lk.lora_linear(x.half(), W.half(), b.half(), A.bfloat16(), B.bfloat16(), 1.0, backend="triton")


def test_unknown_or_unavailable_backend():
    x, W, b, A, B, _ = make_inputs(2, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.lora_linear(x, W, b, A, B, 1.0, backend="cuda")
    if "native" not in lk.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="needs the compiled extension"):
            lk.lora_linear(x, W, b, A, B, 1.0, backend="native")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on device meta"):
            lk.lora_linear(*(t.to("meta") for t in (x, W, b, A, B)), 1.0, backend="triton")


# ---------------------------------------------------------------------------------------------------
# LoRALinear vs. PEFT's lora.Linear
# ---------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e .[test])")


def peft_linear(base: nn.Linear, r, alpha, dropout=0.0, use_rslora=False):
    from peft.tuners.lora import Linear as PeftLinear
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    return PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      use_rslora=use_rslora)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_lora_linear_module_matches_peft(backend, use_rslora):
    require_backend(backend, "cpu")
    torch.manual_seed(0)
    base = nn.Linear(24, 18)
    ours = lk.LoRALinear(nn.Linear(24, 18), r=6, lora_alpha=12, use_rslora=use_rslora)
    ours.backend = backend
    ref = peft_linear(base, 6, 12, use_rslora=use_rslora)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert ours.scaling == ref.scaling
    nn.init.normal_(ref.lora_B["default"].weight)  # PEFT's B starts at zero: make the LoRA path visible
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for mod in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, mod)["default"].weight.grad,
                                   getattr(ref, mod)["default"].weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.base_layer.weight.grad is None and not ours.base_layer.weight.requires_grad


def test_lora_linear_module_init_scaling_and_merge():
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(32, 16), r=4, lora_alpha=8, lora_dropout=0.1)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert A.abs().max() <= bound and A.std() > bound / 4
    assert isinstance(layer.lora_A, nn.ModuleDict) and isinstance(layer.lora_A["default"], nn.Linear)
    nn.init.normal_(B)
    layer.eval()  # dropout off
    x = torch.randn(7, 32)
    y = layer(x)
    layer.scaling["default"] = 0.0  # read at every forward
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.scaling["default"] = 2.0
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="Already merged"):
        layer.merge()  # no double merge
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    # training mode applies dropout to the LoRA path only
    layer.train()
    torch.manual_seed(3)
    yt = layer(x)
    assert not torch.allclose(yt, y)


def test_lora_linear_from_peft_shares_parameters():
    torch.manual_seed(0)
    ref = peft_linear(nn.Linear(16, 12), 4, 8, dropout=0.1)
    ours = lk.LoRALinear.from_peft(ref)
    assert ours.lora_A["default"].weight is ref.lora_A["default"].weight
    assert ours.base_layer is ref.base_layer
    assert ours.dropout_p == 0.1 and ours.scaling == ref.scaling
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    nn.init.normal_(ref.lora_B["default"].weight)
    ours.eval(), ref.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_lora_linear_module_rejects_bad_config():
    with pytest.raises(ValueError, match="r must be a positive int"):
        lk.LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        lk.LoRALinear(nn.Linear(4, 4), lora_dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        lk.LoRALinear(nn.Conv1d(4, 4, 1))


# ---------------------------------------------------------------------------------------------------
# torch.compile and registration
# ---------------------------------------------------------------------------------------------------

def test_compile_fullgraph_forward_backward():
    x, W, b, A, B, dy = make_inputs(6, 16, 12, 4, torch.float32)
    A.requires_grad_()
    B.requires_grad_()

    def f(x, A, B):
        return lk.lora_linear(x, W, b, A, B, 0.5, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    y = compiled(x, A, B)
    y.backward(dy)
    y_ref, _, dA_ref, dB_ref = reference_outputs(x, W, b, A, B, dy, 0.5, 0.0, None)
    assert_close_to_ref(y, y_ref, torch.float32, "y")
    assert_close_to_ref(A.grad, dA_ref, torch.float32, "dA")
    assert_close_to_ref(B.grad, dB_ref, torch.float32, "dB")


@pytest.mark.parametrize("device", [cuda_param()])
def test_compile_fullgraph_triton_gpu(device):
    x, W, b, A, B, dy = make_inputs(64, 128, 96, 16, torch.bfloat16, torch.float32, device=device)
    A.requires_grad_()
    compiled = torch.compile(lambda x, A: lk.lora_linear(x, W, b, A, B, 0.5, backend="triton"), fullgraph=True)
    compiled(x, A).backward(dy)
    _, _, dA_ref, _ = reference_outputs(x, W, b, A, B, dy, 0.5, 0.0, None)
    assert_close_to_ref(A.grad, dA_ref, torch.bfloat16, "dA")


def test_opcheck_registered_ops():
    x, W, b, A, B, dy = make_inputs(5, 12, 10, 3, torch.float32)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default,
                          (x, W, b, A.requires_grad_(), B.requires_grad_(), 0.5, 0.0, None, "torch"))
    S = torch.randn(5, 3)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default,
                          (dy, x, W, A.detach(), B.detach(), S, 0.5, 0.1, new_seed(), True, True, False, "torch"))


@pytest.mark.parametrize("M,K,p", [(5, 7, 0.3), (0, 4, 0.1), (33, 130, 0.9), (3, 1, 0.5)])
def test_dropout_mask_is_the_definition(M, K, p):
    """lk.dropout_mask (the extension's generator when built) gives the bits of the plain-torch definition."""
    from lora_kernels.dropout import dropout_mask_torch
    if lk.backends.NATIVE is None:
        pytest.skip("the lora_kernels._C extension is not built: lk.dropout_mask is dropout_mask_torch itself")
    seed = new_seed()
    got = lk.dropout_mask(seed, (M, K), p)
    assert got.dtype == torch.bool and got.shape == (M, K)
    assert torch.equal(got, dropout_mask_torch(seed, (M, K), p))
