"""The native (C++) CPU training ops of the multi-adapter op: `native_multi_lora_linear_fwd` / `_bwd` against
the per-token float64 reference of lora_kernels.reference and against the "torch" backend (same S, same seed),
in fp32 / fp64 / bf16, every subset of the need flags, the GEMM and per-token paths, the registrations
(opcheck, the CUDA key's message) and bad input. tests/test_multi_lora_grad.py runs the same cases through
`multi_lora_linear(..., backend="native")` with autograd.
"""
from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels.dropout import new_seed
from lora_kernels.ops import multi_lora as ops
from lora_kernels.ops.multi_lora import LoRABatch

from conftest import assert_close_to_ref
from test_multi_lora_grad import CASES, F64, _check_padding_grads, _problem, _reference

pytestmark = pytest.mark.skipif(
    "native" not in lk.available_backends("cpu"),
    reason="the lora_kernels._C extension is not built (pip install --no-build-isolation -e .)")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(F64, id="fp64"), pytest.param(torch.bfloat16, id="bf16")]
NEEDS = [pytest.param(n, id="".join(c for c, b in zip("xAB", n) if b) or "none")
         for n in [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                   (False, True, True), (True, False, True), (False, False, False)]]


def _args(p, with_dropout=True):
    """The implementations' arguments for problem p: x and dy as [T, in] / [T, out], the LoRABatch tensors, the
    dropout probabilities [L] float64 and a fresh seed (both None without dropout)."""
    x2, dy2 = p["x"].reshape(-1, p["x"].shape[-1]), p["dy"].reshape(-1, p["dy"].shape[-1])
    bt = LoRABatch.from_token_adapters(p["ta"], p["L"]).op_args()
    dropout, seed = ops.dropout_args(p["dropout"], p["L"], "cpu", training=with_dropout)
    return x2, dy2, bt, dropout, seed


def _fwd_bwd(backend, p, need=(True, True, True), args=None):
    """(y, S, dx, dA, dB) of IMPLS[backend] on problem p (the forward's S feeds the backward)."""
    x2, dy2, bt, dropout, seed = args or _args(p)
    fwd, bwd = ops.IMPLS[backend]
    y, S = fwd(x2, p["W"], p["bias"], p["A"], p["B"], p["scalings"], bt, p["ranks"], dropout, seed)
    return (y, S, *bwd(dy2, x2, p["W"], p["A"], p["B"], S, p["scalings"], bt, p["ranks"], dropout, seed, *need))


def _check_vs_reference(p, need=(True, True, True)):
    args = _args(p)
    y, S, dx, dA, dB = _fwd_bwd("native", p, need, args)
    y_ref, dx_ref, dA_ref, dB_ref = _reference(p, args[4])
    dtype = p["x"].dtype
    assert y.dtype == dtype and S.dtype == ops._compute_dtype(p["x"], p["A"][0])
    assert_close_to_ref(y, y_ref, dtype, "y")
    for name, got, want, needed, like in (("dx", [dx], [dx_ref], need[0], [args[0]]),
                                          ("dA", dA, dA_ref, need[1], p["A"]), ("dB", dB, dB_ref, need[2], p["B"])):
        if not needed:
            assert got in (None, [None]), f"{name} computed although not needed"
            continue
        for i, (g, r, t) in enumerate(zip(got, want, like)):
            assert g.dtype == t.dtype and g.shape == t.shape, f"{name}[{i}]: {g.dtype} {tuple(g.shape)}"
            # The stacks' gradients are float32-accurate when the stacks are float32 (inputs exact in bf16).
            tol = dtype if name == "dx" or t.dtype == dtype else torch.float32
            assert_close_to_ref(g, r, tol, f"{name}[{i}]")
    _check_padding_grads(p, dA if need[1] else None, dB if need[2] else None)


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_grads_match_reference(case, dtype):
    _check_vs_reference(_problem(**CASES[case], dtype=dtype))


@pytest.mark.parametrize("need", NEEDS)
def test_need_flags(need):
    _check_vs_reference(_problem(**CASES["zipf-strided-dropout"], seed=1), need)


def _runs_problem(dropout, dtype=torch.float32):
    """Tokens sorted by slot: every segment is one block of rows (read in place, dx's rows updated in place when
    there is no dropout), long segments (GEMMs) beside short ones (per token), -1 tokens first."""
    p = _problem(T=70, L=6, widths=(16, 8), ranks=(24, 3, 1, 9, 0, 5), dist="zipf", dropout=dropout, dtype=dtype)
    p["ta"] = p["ta"].sort().values
    return p


@pytest.mark.parametrize("dropout", [None, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_consecutive_segments_and_threads(dropout, threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_vs_reference(_runs_problem(dropout))
    finally:
        torch.set_num_threads(prev)


def test_mixed_dtypes():
    """bf16 activations with fp32 stacks: each gradient in its tensor's dtype, computed in float32."""
    _check_vs_reference(_problem(**CASES["uniform-3slices-dropout"], dtype=torch.bfloat16, lora_dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------
# Against the "torch" backend: the same math on the same S and mask
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("need", NEEDS[:1] + NEEDS[4:6])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_backend(case, need):
    p = _problem(**CASES[case])
    args = _args(p)
    x2, dy2, bt, dropout, seed = args
    y_t, S_t, *g_t = _fwd_bwd("torch", p, need, args)
    y_n, S_n, *_ = _fwd_bwd("native", p, need, args)
    torch.testing.assert_close(S_n, S_t, rtol=1e-5, atol=1e-6)  # the same mask: x̂ Aᵀ agrees to rounding
    torch.testing.assert_close(y_n, y_t, rtol=1e-5, atol=1e-5)
    # The native backward on the torch forward's S: only the backward differs.
    g_n = ops.IMPLS["native"][1](dy2, x2, p["W"], p["A"], p["B"], S_t, p["scalings"], bt, p["ranks"], dropout, seed,
                                 *need)
    for name, a, b in zip(("dx", "dA", "dB"), g_n, g_t):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_no_dropout_without_seed():
    """dropout given but no seed: no dropout (the op's convention), as the torch backend."""
    p = _problem(**CASES["identical-dropout"])
    x2, dy2, bt, dropout, _ = _args(p)
    plain = _fwd_bwd("native", {**p, "dropout": None})
    got = _fwd_bwd("native", p, args=(x2, dy2, bt, dropout, None))
    for a, b in zip(plain[:3] + tuple(plain[3] + plain[4]), got[:3] + tuple(got[3] + got[4])):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Registrations and bad input
# ---------------------------------------------------------------------------------------------------

def test_opcheck():
    p = _problem(**{**CASES["uniform-3slices-dropout"], "T": 11, "lead": None, "in_f": 12, "R": 5,
                    "ranks": (1, 5, 0, 4, 3, 2)})
    p["ta"][:3] = 1  # slot 1 gets >= 8 tokens: the GEMM path runs beside the per-token one
    p["ta"][3:8] = 1
    x2, dy2, bt, dropout, seed = _args(p)
    N = torch.ops.lora_kernels
    for d, s in ((None, None), (dropout, seed)):
        fwd_args = (x2, p["W"], p["bias"], p["A"], p["B"], p["scalings"], *bt, p["ranks"], d, s)
        torch.library.opcheck(N.native_multi_lora_linear_fwd, fwd_args)
        grad_args = (x2.clone().requires_grad_(), p["W"], p["bias"], [a.clone().requires_grad_() for a in p["A"]],
                     [b.clone().requires_grad_() for b in p["B"]], *fwd_args[5:])
        torch.library.opcheck(N.native_multi_lora_linear_fwd, grad_args)  # with its autograd formula
        S = N.native_multi_lora_linear_fwd(*fwd_args)[1]
        for need in ((True, True, True), (False, True, False), (False, False, False)):
            torch.library.opcheck(N.native_multi_lora_linear_bwd,
                                  (dy2, x2, p["W"], p["A"], p["B"], S, p["scalings"], *bt, p["ranks"], d, s, *need))


@pytest.mark.parametrize("need", NEEDS[:4])
def test_autograd_of_the_native_op(need):
    """native_multi_lora_linear_fwd is differentiable on its own (its backward is native_multi_lora_linear_bwd)."""
    p = _problem(**CASES["zipf-strided-dropout"])
    x2, dy2, bt, dropout, seed = _args(p)
    x = x2.detach().requires_grad_(need[0])
    A = [a.clone().requires_grad_(need[1]) for a in p["A"]]
    B = [b.clone().requires_grad_(need[2]) for b in p["B"]]
    y, _ = torch.ops.lora_kernels.native_multi_lora_linear_fwd(x, p["W"], p["bias"], A, B, p["scalings"], *bt,
                                                               p["ranks"], dropout, seed)
    y.backward(dy2)
    _, dx_ref, dA_ref, dB_ref = _reference(p, seed)
    for t, r, needed, name in [(x, dx_ref, need[0], "dx")] + [(a, r, need[1], "dA") for a, r in zip(A, dA_ref)] + \
            [(b, r, need[2], "dB") for b, r in zip(B, dB_ref)]:
        if needed:
            assert_close_to_ref(t.grad, r, torch.float32, name)
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("name", ["native_multi_lora_linear_fwd", "native_multi_lora_linear_bwd"])
def test_cuda_key_says_what_to_use(name):
    """The CUDA kernel of the training ops raises with the backends to use instead (called through the CUDA key
    directly: no GPU needed)."""
    p = _problem(**CASES["distinct"])
    x2, dy2, bt, _, _ = _args(p)
    S = torch.zeros(x2.shape[0], 24)
    rest = (p["scalings"], *bt, p["ranks"], None, None)
    args = ((x2, p["W"], None, p["A"], p["B"], *rest) if name.endswith("fwd")
            else (dy2, x2, p["W"], p["A"], p["B"], S, *rest, True, True, True))
    op = getattr(torch.ops.lora_kernels, name).default
    with pytest.raises(RuntimeError,
                       match=r"not implemented on CUDA in the native backend.*backend=None/'composite'/'triton'"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def test_errors():
    p = _problem(**CASES["uniform-3slices-dropout"])
    x2, dy2, bt, dropout, seed = _args(p)
    N = torch.ops.lora_kernels
    S = N.native_multi_lora_linear_fwd(x2, p["W"], None, p["A"], p["B"], p["scalings"], *bt, p["ranks"], dropout,
                                       seed)[1]

    def bwd(**kw):
        a = dict(dy=dy2, x=x2, W=p["W"], S=S, dropout=dropout, seed=seed)
        a.update(kw)
        return N.native_multi_lora_linear_bwd(a["dy"], a["x"], a["W"], p["A"], p["B"], a["S"], p["scalings"], *bt,
                                              p["ranks"], a["dropout"], a["seed"], True, True, True)

    with pytest.raises(RuntimeError, match=r"dy must have shape \[T=36, out=48\]"):
        bwd(dy=dy2[:, :-1])
    with pytest.raises(RuntimeError, match=r"dy .* must have x's dtype"):
        bwd(dy=dy2.double())
    with pytest.raises(RuntimeError, match=r"S must be a float tensor of shape \[T=36, NS\*R=72\]"):
        bwd(S=S[:, :-1])
    with pytest.raises(RuntimeError, match=r"dropout must be a float tensor of shape \[L=6\] when seed is given"):
        bwd(dropout=None)
    with pytest.raises(RuntimeError, match=r"dropout\[1\] must be in \[0, 1\), got 1"):
        bwd(dropout=torch.tensor([0.1, 1.0, 0, 0, 0, 0], dtype=F64))
    with pytest.raises(RuntimeError, match=r"seed must be None or a CPU int64 tensor with one element"):
        bwd(seed=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"weight must have shape \[out=sum\(B out\)=48, in=38\]"):
        bwd(W=p["W"][:-1])
    bad = list(bt)
    bad[3] = bad[3].clone()
    bad[3][0] += 1  # seg_lens no longer matches token_adapter
    with pytest.raises(RuntimeError, match=r"do not cover the .* tokens of slot 0"):
        N.native_multi_lora_linear_bwd(dy2, x2, p["W"], p["A"], p["B"], S, p["scalings"], *bad, p["ranks"], None, None,
                                       True, True, True)
