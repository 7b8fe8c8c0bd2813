"""Autograd of the multi-adapter op `multi_lora_linear`: every backend's dx / dA / dB (and y) against the
per-token float64 loops of lora_kernels.reference, per-slot dropout with the regenerated mask, the eager path
against the registered ops, what the backward saves, errors, torch.compile and opcheck.

Triton runs under the interpreter on CPU (TRITON_INTERPRET=1): shapes are small on purpose.
"""
from __future__ import annotations

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels import dispatch, reference as ref
from lora_kernels.dropout import new_seed
from lora_kernels.ops import multi_lora as ops
from lora_kernels.ops import plumbing
from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear

from conftest import assert_close_to_ref
from test_multi_lora import _poison  # noqa: F401 (autouse: kernel outputs start as NaN)

F64 = torch.float64
_WHY = {"torch": "",
        "triton": "Triton on CPU tensors needs TRITON_INTERPRET=1 set before lora_kernels is imported",
        "composite": "Triton on CPU tensors needs TRITON_INTERPRET=1 set before lora_kernels is imported",
        "native": "the lora_kernels._C extension is not built (pip install --no-build-isolation -e .)"}
BACKENDS = [pytest.param(b, id=b, marks=pytest.mark.skipif(b not in lk.available_backends("cpu"), reason=why))
            for b, why in _WHY.items()]

# The cases: heterogeneous ranks 1-24 with rank-0 slots (no adapter in this layer), -1 tokens, slots without
# tokens (the last slot never gets one), 1-3 output slices of different widths, per-slot dropout (p = 0 for
# some slots), the adapter distributions of serving benchmarks, leading dims and a strided x. in = 38: not a
# multiple of 4 (the mask's Philox groups of four columns are cut at the row end).
CASES = {
    "distinct": dict(T=7, L=8, widths=(16,), ranks=(1, 24, 0, 7, 13, 5, 16, 2), dist="distinct"),
    "uniform-3slices-dropout": dict(T=36, L=6, widths=(24, 8, 16), ranks=(1, 24, 0, 7, 3, 16), dist="uniform",
                                    dropout=(0.3, 0.0, 0.5, 0.1, 0.0, 0.2), lead=(4, 9)),
    "zipf-strided-dropout": dict(T=40, L=8, widths=(12, 20), ranks=(24, 3, 1, 9, 0, 5, 17, 2), dist="zipf",
                                 dropout=0.25, strided=True),
    "identical-dropout": dict(T=20, L=3, widths=(24,), ranks=(5, 24, 3), dist="identical", dropout=0.1),
    "empty": dict(T=0, L=4, widths=(8, 16), ranks=(2, 24, 0, 1), dist="uniform", dropout=0.5),
}


def _assignment(dist: str, T: int, L: int, g: torch.Generator) -> torch.Tensor:
    """Slot ids in [-1, L - 1): slot L - 1 never has a token."""
    if dist == "distinct":   # every token on its own slot (decode-like), scattered
        return torch.randperm(L - 1, generator=g)[:T]
    if dist == "uniform":    # with -1 tokens
        return torch.randint(-1, L - 1, (T,), generator=g)
    if dist == "zipf":       # a popular head, a long tail, some -1 tokens
        w = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(L - 1)] + [0.3])
        ids = torch.multinomial(w, T, replacement=True, generator=g)
        return torch.where(ids == L - 1, -1, ids)
    if dist == "identical":  # all tokens on one slot
        return torch.full((T,), 1, dtype=torch.int64)
    raise ValueError(dist)


def _problem(T, L, widths, ranks, dist, dropout=None, lead=None, strided=False, in_f=38, R=24,
             dtype=torch.float32, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    if strided:  # every other column of a wider tensor
        x = torch.randn(T, 2 * in_f, generator=g).to(dtype)[:, ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(T, in_f, generator=g).to(dtype)
    if lead is not None:
        x = x.view(*lead, in_f)
    A = [(torch.randn(L, R, in_f, generator=g) / in_f ** 0.5).to(lora_dtype) for _ in widths]
    B = [(torch.randn(L, n, R, generator=g) / R ** 0.5).to(lora_dtype) for n in widths]
    W = (torch.randn(sum(widths), in_f, generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(sum(widths), generator=g).to(dtype)
    scalings = torch.rand(L, generator=g) + 0.5
    rk = torch.tensor(ranks, dtype=torch.int32)
    ta = _assignment(dist, T, L, g)
    dp = torch.tensor(dropout, dtype=torch.float32) if isinstance(dropout, tuple) else dropout
    dy = torch.randn(*x.shape[:-1], sum(widths), generator=g).to(dtype)
    return dict(x=x, A=A, B=B, W=W, bias=bias, scalings=scalings, ranks=rk, ta=ta, L=L, dropout=dp, dy=dy)


def _forward(p, backend, need=(True, True, True), training=True):
    """y and the dropout seed the call drew (None without dropout); x / A / B require grad as `need` says."""
    x = p["x"].detach().requires_grad_(need[0])
    A = [a.detach().requires_grad_(need[1]) for a in p["A"]]
    B = [b.detach().requires_grad_(need[2]) for b in p["B"]]
    state = torch.random.get_rng_state()
    y = multi_lora_linear(x, p["W"], p["bias"], A, B, p["scalings"], LoRABatch.from_token_adapters(p["ta"], p["L"]),
                          p["ranks"], backend=backend, dropout_p=p["dropout"], training=training)
    seed = None
    if torch.random.get_rng_state().ne(state).any():  # the op drew a seed: draw the same one again
        after = torch.random.get_rng_state()
        torch.random.set_rng_state(state)
        seed = new_seed()
        torch.random.set_rng_state(after)
    return y, seed, x, A, B


def _slot_mask(seed, ta, K, dropout, L):
    """The spec's mask: row t is row t of lk.dropout_mask(seed, (T, K), p of t's slot); ps: the slot probs."""
    T = ta.shape[0]
    ps = dropout.tolist() if isinstance(dropout, torch.Tensor) else [dropout] * L
    m = torch.ones(T, K, dtype=torch.bool)
    for l, q in enumerate(ps):
        rows = ta == l
        if q > 0 and rows.any():
            m[rows] = lk.dropout_mask(seed, (T, K), q)[rows]
    return m, ps


def _reference(p, seed):
    x, dy = p["x"].reshape(-1, p["x"].shape[-1]).to(F64), p["dy"].reshape(-1, p["dy"].shape[-1]).to(F64)
    mask, ps = (None, None) if seed is None else _slot_mask(seed, p["ta"], x.shape[1], p["dropout"], p["L"])
    A, B = [a.to(F64) for a in p["A"]], [b.to(F64) for b in p["B"]]
    args = (p["W"].to(F64), A, B, p["scalings"], p["ta"], p["ranks"])
    y = ref.multi_lora_linear_forward(x, args[0], p["bias"].to(F64), *args[1:], keep_mask=mask, dropout_p=ps)
    dx, dA, dB = ref.multi_lora_linear_backward(dy, x, *args, keep_mask=mask, dropout_p=ps)
    return y, dx, dA, dB


def _check_padding_grads(p, dA, dB):
    """Exact zeros: slots without tokens or of rank 0, rows past r_l of dA, columns past r_l of dB."""
    used = set(p["ta"].tolist())
    for l, r in enumerate(p["ranks"].tolist()):
        r = r if l in used else 0
        for g in dA or ():
            assert not g[l, r:].any(), f"dA of slot {l} past rank {r}"
        for g in dB or ():
            assert not g[l, :, r:].any(), f"dB of slot {l} past rank {r}"


def _check(backend, p, need=(True, True, True)):
    y, seed, x, A, B = _forward(p, backend, need)
    if p["dropout"] is not None and p["x"].numel() > 0:
        assert seed is not None, "training with dropout must draw a seed"
    dtype = p["x"].dtype
    y_ref, dx_ref, dA_ref, dB_ref = _reference(p, seed)
    assert y.shape == (*p["x"].shape[:-1], p["W"].shape[0]) and y.dtype == dtype
    assert_close_to_ref(y.reshape(y_ref.shape), y_ref, dtype, "y")
    if any(need):
        y.backward(p["dy"])
    tol_dtype = dtype if p["A"][0].dtype == dtype else torch.float32
    if need[0]:
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        assert_close_to_ref(x.grad.reshape(dx_ref.shape), dx_ref, dtype, "dx")
    else:
        assert x.grad is None
    for name, got, want, needed in (("dA", A, dA_ref, need[1]), ("dB", B, dB_ref, need[2])):
        for i, (t, r) in enumerate(zip(got, want)):
            if not needed:
                assert t.grad is None, f"{name}[{i}] computed although not required"
                continue
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close_to_ref(t.grad, r, tol_dtype, f"{name}[{i}]")
    _check_padding_grads(p, [a.grad for a in A] if need[1] else None, [b.grad for b in B] if need[2] else None)


# ---------------------------------------------------------------------------------------------------
# The reference itself: its backward is autograd's through its forward (float64)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [None, (0.3, 0.0, 0.5, 0.1, 0.0, 0.2)], ids=["p0", "per-slot-p"])
def test_reference_backward_is_autograd_of_reference_forward(dropout):
    p = _problem(**{**CASES["uniform-3slices-dropout"], "T": 13, "lead": None, "dropout": dropout, "in_f": 9,
                    "R": 6, "ranks": (1, 6, 0, 4, 3, 5)}, dtype=F64)
    mask, ps = (None, None) if dropout is None else _slot_mask(new_seed(), p["ta"], 9, p["dropout"], p["L"])
    x = p["x"].clone().requires_grad_()
    A = [a.clone().requires_grad_() for a in p["A"]]
    B = [b.clone().requires_grad_() for b in p["B"]]
    y = ref.multi_lora_linear_forward(x, p["W"], p["bias"], A, B, p["scalings"], p["ta"], p["ranks"], mask, ps)
    y.backward(p["dy"])
    dx, dA, dB = ref.multi_lora_linear_backward(p["dy"], p["x"], p["W"], p["A"], p["B"], p["scalings"], p["ta"],
                                                p["ranks"], mask, ps)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    for got, t in zip(dA + dB, A + B):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_match_reference(backend, case):
    _check(backend, _problem(**CASES[case]))


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)],
                         ids=["x", "A", "B", "A+B", "x+B"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend, need):
    _check(backend, _problem(**CASES["uniform-3slices-dropout"], seed=1), need)


def test_grad_of_one_stack_only():
    """Only A[1] requires grad: A[0] gets none, A[1] the reference's."""
    p = _problem(**CASES["uniform-3slices-dropout"])
    A = [a.clone().requires_grad_(i == 1) for i, a in enumerate(p["A"])]
    y = multi_lora_linear(p["x"], p["W"], p["bias"], A, p["B"], p["scalings"],
                          LoRABatch.from_token_adapters(p["ta"], p["L"]), p["ranks"], backend="torch")
    y.backward(p["dy"])
    _, _, dA_ref, _ = _reference(p, None)
    assert A[0].grad is None and A[2].grad is None
    assert_close_to_ref(A[1].grad, dA_ref[1], torch.float32, "dA[1]")


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                              (torch.bfloat16, torch.float32)], ids=["bf16", "fp16", "bf16-fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit(backend, dtype, lora_dtype):
    if lora_dtype is not None and backend != "torch":
        pytest.skip("the kernel backends take the A/B stacks in x's dtype")
    _check(backend, _problem(**CASES["zipf-strided-dropout"], dtype=dtype, lora_dtype=lora_dtype))


def test_float64_torch_backend():
    p = _problem(**CASES["uniform-3slices-dropout"], dtype=F64)
    y, seed, x, A, B = _forward(p, "torch")
    y.backward(p["dy"])
    y_ref, dx_ref, dA_ref, dB_ref = _reference(p, seed)
    assert_close_to_ref(x.grad.reshape(dx_ref.shape), dx_ref, F64, "dx")
    for i in range(3):
        assert_close_to_ref(A[i].grad, dA_ref[i], F64, f"dA[{i}]")
        assert_close_to_ref(B[i].grad, dB_ref[i], F64, f"dB[{i}]")


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("generator", ["native", "philox"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_lora_linears_mask(backend, generator, monkeypatch):
    """One slot, x = 1, A = I: S = x̂ Aᵀ is m / (1 - p), bit for bit lk.dropout_mask's -- the mask lora_linear
    regenerates -- with the extension's generator and with the int64 Philox fallback."""
    if generator == "philox":
        monkeypatch.setattr(plumbing, "native_dropout_ok", lambda t: False)
    elif lk.backends.NATIVE is None:
        pytest.skip("the lora_kernels._C extension is not built")
    T, K, q = 21, 18, 0.3
    batch = LoRABatch.from_token_adapters(torch.zeros(T, dtype=torch.int64), 1)
    seed = new_seed()
    y, S = ops.multi_lora_linear_fwd(torch.ones(T, K), torch.zeros(3, K), None, [torch.eye(K)[None]],
                                     [torch.zeros(1, 3, K)], torch.ones(1), *batch.op_args(), None,
                                     torch.tensor([q], dtype=F64), seed, backend)
    expected = lk.dropout_mask(seed, (T, K), q).float() / (1 - q)
    torch.testing.assert_close(S, expected, rtol=1e-6, atol=0)
    assert not torch.equal(S, torch.ones_like(S)), "p = 0.3 must drop something"


def test_one_slot_equals_lora_linear_with_dropout():
    """All tokens on one slot, same seed: y and every gradient equal lora_linear's (same mask, same math)."""
    g = torch.Generator().manual_seed(3)
    T, K, N, r = 15, 22, 10, 4
    x, W, b = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A, B, dy = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(T, N, generator=g)
    outs = []
    for multi in (True, False):
        xs, As, Bs = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
        torch.manual_seed(7)
        if multi:
            batch = LoRABatch.from_token_adapters(torch.zeros(T, dtype=torch.int64), 1)
            y = multi_lora_linear(xs, W, b, As[None], Bs[None], 0.75, batch, backend="torch", dropout_p=0.4,
                                  training=True)
        else:
            y = lk.lora_linear(xs, W, b, As, Bs, 0.75, dropout_p=0.4, training=True, backend="torch")
        y.backward(dy)
        outs.append((y, xs.grad, As.grad, Bs.grad))
    for name, m, s in zip(("y", "dx", "dA", "dB"), *outs):
        torch.testing.assert_close(m, s, rtol=1e-5, atol=1e-5, msg=lambda e: f"{name}: {e}")


def test_dropout_only_when_training():
    p = _problem(**CASES["uniform-3slices-dropout"])
    y_eval, seed, *_ = _forward(p, "torch", training=False)
    assert seed is None, "no dropout, no seed drawn"
    y_plain, *_ = _forward({**p, "dropout": None}, "torch")
    assert torch.equal(y_eval, y_plain)
    y_train, seed, *_ = _forward(p, "torch")
    assert seed is not None and not torch.equal(y_train, y_plain)
    # All-zero probabilities: no dropout, no seed.
    y_zero, seed, *_ = _forward({**p, "dropout": torch.zeros(p["L"])}, "torch")
    assert seed is None and torch.equal(y_zero, y_plain)


# ---------------------------------------------------------------------------------------------------
# Eager path vs. registered ops; what is saved; no autograd machinery without grad
# ---------------------------------------------------------------------------------------------------

def _fwd_bwd(p, backend):
    torch.manual_seed(11)
    y, _, x, A, B = _forward(p, backend)
    y.backward(p["dy"])
    return [y, x.grad, *[a.grad for a in A], *[b.grad for b in B]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_and_registered_ops_bitwise_equal(backend):
    """The profiler routes through the registered ops (and shows them); results are bit for bit the eager ones."""
    p = _problem(**CASES["uniform-3slices-dropout"])
    eager = _fwd_bwd(p, backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        registered = _fwd_bwd(p, backend)
    names = {e.name for e in prof.events()}
    assert {"lora_kernels::multi_lora_linear_fwd", "lora_kernels::multi_lora_linear_bwd"} <= names
    for i, (e, r) in enumerate(zip(eager, registered)):
        assert torch.equal(e, r), f"output {i} differs between the eager path and the registered ops"


@pytest.mark.parametrize("path", ["eager", "registered"])
def test_backward_saves_x_S_seed_and_weights_only(path):
    """Saved: x itself, S [T, NS·R], the seed, W0, the stacks and the small per-step vectors -- no x̂, no mask."""
    p = _problem(**CASES["uniform-3slices-dropout"])
    x = p["x"].clone().requires_grad_()
    A = [a.clone().requires_grad_() for a in p["A"]]
    batch = LoRABatch.from_token_adapters(p["ta"], p["L"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if path == "registered":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                multi_lora_linear(x, p["W"], p["bias"], A, p["B"], p["scalings"], batch, p["ranks"], backend="torch",
                                  dropout_p=p["dropout"], training=True)
        else:
            multi_lora_linear(x, p["W"], p["bias"], A, p["B"], p["scalings"], batch, p["ranks"], backend="torch",
                              dropout_p=p["dropout"], training=True)
    T, K = 36, 38
    inputs = [x, p["W"], *A, *p["B"], p["scalings"], p["ranks"], *batch.op_args()]
    ident = lambda t: (t.data_ptr(), t.numel(), t.dtype)  # noqa: E731 (x is saved as its [T, in] view)
    known = {ident(t) for t in inputs}
    others = [t for t in saved if ident(t) not in known]
    S = [t for t in others if t.shape == (T, 3 * 24) and t.dtype == torch.float32]
    seeds = [t for t in others if t.shape == (1,) and t.dtype == torch.int64]
    probs = [t for t in others if t.shape == (p["L"],) and t.dtype == F64]  # the dropout probabilities
    assert len(S) == 1 and len(seeds) == 1 and len(S) + len(seeds) + len(probs) == len(others), \
        [(tuple(t.shape), t.dtype) for t in others]
    assert ident(x) in {ident(t) for t in saved}, "x must be saved (as itself)"
    assert not any(t.dtype == torch.bool for t in saved), "a mask was saved"
    assert not [t for t in saved if t.shape == (T, K) and ident(t) != ident(x)], "x̂ (or a mask) was saved"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_autograd_without_grad(backend):
    """The inference path builds no graph: nothing requires grad, or autograd is off."""
    p = _problem(**CASES["distinct"])
    y, *_ = _forward(p, backend, need=(False, False, False))
    assert y.grad_fn is None
    with torch.no_grad():
        y2, *_ = _forward(p, backend, need=(True, True, True))
    assert y2.grad_fn is None and torch.equal(y, y2)
    y3, *_ = _forward(p, backend, need=(False, True, False))
    node = y3.grad_fn.next_functions[0][0]  # under the view to [..., out]
    assert type(node).__name__ == "LoRAFunctionBackward", y3.grad_fn
    # Not bitwise for "triton": inference runs its fused GEMM, training the composite schedule (it keeps S).
    torch.testing.assert_close(y3, y, rtol=1e-5, atol=1e-5)


def test_measured_dispatch(tmp_path, monkeypatch):
    """backend=None with tuning on: the forward runs what the "fwd" key measured, the backward what the "bwd"
    key measured among the backends with a backward of their own (every backend on CPU has one, so the machinery
    runs whatever this machine offers); the gradients are the reference's either way."""
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_KERNELS_TUNE", "1")
    others = [b for b in lk.available_backends("cpu") if b != "torch"]
    dispatch.reset()
    try:
        _check(None, _problem(**{**CASES["distinct"], "dropout": 0.2}))
        keys = list(dispatch.choices())
    finally:
        dispatch.reset()
    assert any(k.startswith("multi_lora_linear/fwd/") for k in keys), keys
    if others:
        assert any(k.startswith("multi_lora_linear/bwd/") and "drop=1,need=111" in k for k in keys), keys


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_errors():
    p = _problem(**CASES["uniform-3slices-dropout"])
    batch = LoRABatch.from_token_adapters(p["ta"], p["L"])
    A = [a.clone().requires_grad_() for a in p["A"]]

    def call(**kw):
        args = dict(x=p["x"], weight=p["W"], bias=p["bias"], A_stack=A, B_stack=p["B"], scalings=p["scalings"],
                    batch=batch, ranks=p["ranks"], backend="torch")
        return multi_lora_linear(**{**args, **kw})

    for name in ("weight", "bias"):
        t = p["W" if name == "weight" else "bias"].clone().requires_grad_()
        with pytest.raises(ValueError, match=f"{name} requires grad.*frozen"):
            call(**{name: t})
        with torch.no_grad():
            call(**{name: t})  # autograd off: fine
    for bad in (torch.full((5,), 0.1), torch.full((6, 1), 0.1), torch.zeros(6, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"dropout_p must be None, a float or a float tensor of shape \[L=6\]"):
            call(dropout_p=bad, training=True)
    for bad in (torch.tensor([0.1, 1.0, 0, 0, 0, 0]), torch.tensor([-0.1, 0, 0, 0, 0, 0]),
                torch.tensor([math.nan, 0, 0, 0, 0, 0])):
        with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\) for every slot"):
            call(dropout_p=bad)  # checked even when not training
    for bad in (1.0, -0.5, "0.1", True):
        with pytest.raises(ValueError, match=r"dropout_p must be None, a float in \[0, 1\)"):
            call(dropout_p=bad, training=True)


# ---------------------------------------------------------------------------------------------------
# torch.compile and registration
# ---------------------------------------------------------------------------------------------------

def test_compile_fullgraph_training_step():
    """A training step compiles with fullgraph=True: the forward graph holds multi_lora_linear_fwd, the backward
    graph multi_lora_linear_bwd, both opaque; y and the gradients equal the eager ones (same seed)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    p = _problem(**CASES["uniform-3slices-dropout"])
    batch = LoRABatch.from_token_adapters(p["ta"], p["L"])
    graphs = []

    def record(gm, _):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    def step(x, A0, A1, A2, B0, B1, B2, batch):
        y = multi_lora_linear(x, p["W"], p["bias"], [A0, A1, A2], [B0, B1, B2], p["scalings"], batch, p["ranks"],
                              backend="torch", dropout_p=p["dropout"], training=True)
        return (y * p["dy"]).sum(), y

    results = []
    for compiled in (False, True):
        x = p["x"].clone().requires_grad_()
        stacks = [t.clone().requires_grad_() for t in p["A"] + p["B"]]
        fn = step
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        torch.manual_seed(5)
        loss, y = fn(x, *stacks, batch)
        loss.backward()
        results.append([y, x.grad, *[t.grad for t in stacks]])
    assert len(graphs) == 2, graphs
    assert "multi_lora_linear_fwd" in graphs[0] and "multi_lora_linear_bwd" not in graphs[0]
    assert "multi_lora_linear_bwd" in graphs[1]
    for i, (e, c) in enumerate(zip(*results)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"output {i}: {m}")


def test_opcheck():
    p = _problem(**{**CASES["uniform-3slices-dropout"], "T": 9, "lead": None, "in_f": 12, "R": 5,
                    "ranks": (1, 5, 0, 4, 3, 2)})
    bt = LoRABatch.from_token_adapters(p["ta"], p["L"]).op_args()
    x, W, b, sc, rk = p["x"], p["W"], p["bias"], p["scalings"], p["ranks"]
    dropout, seed = p["dropout"].to(F64), new_seed()
    A = [a.clone().requires_grad_() for a in p["A"]]
    B = [t.clone().requires_grad_() for t in p["B"]]
    torch.library.opcheck(ops.multi_lora_linear_fwd, (x.clone().requires_grad_(), W, b, A, B, sc, *bt, rk, dropout,
                                                      seed, "torch"))
    torch.library.opcheck(ops.multi_lora_linear_fwd, (x, W, None, A, B, sc, *bt, None, None, None, "torch"))
    _, S = ops.multi_lora_linear_fwd(x, W, b, p["A"], p["B"], sc, *bt, rk, dropout, seed, "torch")
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(ops.multi_lora_linear_bwd, (p["dy"], x, W, p["A"], p["B"], S, sc, *bt, rk, dropout, seed,
                                                          *need, "torch"))
