"""The C++/CUDA extension lora_kernels._C (backend "native"): the dropout mask vs. lora_kernels.dropout bit for
bit, the CPU kernels vs. the float64 reference on the cases of test_lora_linear.py and test_multi_lora.py,
registrations (opcheck, fake tensors, autograd, torch.compile), errors, and the build check script.
GPU tests (marked gpu) run the CUDA kernels on the same cases, a tensor with more than 2^31 elements and a
CUDA-graph capture; they are skipped with a reason without CUDA.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.backends import NATIVE, NATIVE_ERROR
from lora_kernels.dropout import keep_threshold, new_seed, philox4x32
from lora_kernels.ops.multi_lora import LoRABatch, lora_expand, lora_shrink, multi_lora_linear
from lora_kernels.ops.native import NATIVE_OPS

from conftest import assert_close_to_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
ops = torch.ops.lora_kernels

pytestmark = pytest.mark.skipif(
    NATIVE is None, reason=f"the lora_kernels._C extension is not built ({NATIVE_ERROR}); "
                           "`make test` builds it (LORA_KERNELS_NO_EXT=1 skips it)")

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the CUDA kernels only compile here)")]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
# (atol, rtol) of multi-adapter outputs vs. the float64 reference, for O(1) values (as test_multi_lora.py).
MULTI_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3),
             torch.float64: (1e-12, 1e-12)}


def _poison_allocator(device: str, nbytes: int) -> None:
    """Leave NaN-filled blocks in the CUDA caching allocator, so outputs a kernel fails to write read as NaN."""
    if device != "cuda":
        return  # the CPU kernels are ATen compositions that write whole outputs
    blocks = [torch.full((nbytes // 4 + 1,), float("nan"), device=device) for _ in range(4)]
    del blocks


# ---------------------------------------------------------------------------------------------------
# The dropout ops: masks bit-identical to lora_kernels/dropout.py's pure-torch Philox (4 columns per call)
# ---------------------------------------------------------------------------------------------------

def torch_mask(seed, shape, p):
    """The keep-mask [M, K] from dropout.py's integer tensor ops (never the extension, whatever dropout_mask uses)."""
    M, K = shape
    return _mask_rows(int(seed), torch.arange(M), K, p)


# Seeds at the ends of the 64-bit key (a negative int64 is the key's two's complement, as in dropout.py) and p at
# the ends of [0, 1): the threshold's extremes.
SEEDS_PS = [(new_seed(), 0.3), (torch.tensor([2**62 - 1]), 0.5), (torch.tensor([2**32 + 7]), 0.9),
            (torch.tensor([2**63 - 1]), 0.1), (torch.tensor([-5]), 0.7), (new_seed(), 1e-9), (new_seed(), 0.0),
            (new_seed(), 1 - 2**-30)]
# K < 4, odd K, K around the CPU generator's 256-column chunks and its 16-group (64-column) steps; M = 0.
MASK_SHAPES = [(0, 5), (3, 0), (1, 1), (5, 2), (4, 3), (3, 5), (7, 8), (13, 70), (3, 255), (3, 257), (2, 513),
               (4, 1027), (130, 33)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,K", MASK_SHAPES, ids=lambda v: str(v))
def test_dropout_mask_op_bit_identical(device, M, K):
    for seed, p in SEEDS_PS:
        keep = ops.native_dropout_mask(seed, M, K, p, None if device == "cpu" else torch.device(device))
        assert keep.dtype == torch.bool and keep.shape == (M, K) and keep.device.type == device
        assert torch.equal(keep.cpu(), torch_mask(seed, (M, K), p)), f"mask differs for seed={int(seed)} p={p}"


def test_dropout_mask_op_threads_and_isa():
    """The chunks of a large mask spread over threads give the same bits; the portable generator
    (LORA_KERNELS_CPU_ISA=scalar, the path of CPUs without AVX2) gives the same bits as the vector one."""
    assert NATIVE.CPU_DROPOUT_ISA in ("avx2", "scalar")
    seed, M, K = new_seed(), 37, 3001
    before = torch.get_num_threads()
    try:
        masks = []
        for n in (1, 2):
            torch.set_num_threads(n)
            masks.append(ops.native_dropout_mask(seed, M, K, 0.4))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], torch_mask(seed, (M, K), 0.4))
    code = (
        "import torch, lora_kernels as lk\n"
        "from lora_kernels.backends import NATIVE\n"
        "from lora_kernels.dropout import philox4x32, keep_threshold\n"
        "assert NATIVE.CPU_DROPOUT_ISA == 'scalar', NATIVE.CPU_DROPOUT_ISA\n"
        "seed, M, K, p = 2**62 - 3, 9, 1027, 0.3\n"
        "K4 = (K + 3) // 4\n"
        "bits = torch.stack(philox4x32(seed, torch.arange(M * K4).view(M, K4)), -1).view(M, 4 * K4)[:, :K]\n"
        "ref = (bits >> 1) >= keep_threshold(p)\n"
        "s = torch.tensor([seed])\n"
        "assert torch.equal(torch.ops.lora_kernels.native_dropout_mask(s, M, K, p), ref)\n"
        "x = torch.randn(M, K)\n"
        "assert torch.equal(torch.ops.lora_kernels.native_dropout(x, p, s) != 0, ref & (x != 0))\n"
        "print('ok')\n")
    env = dict(os.environ, LORA_KERNELS_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 8), (13, 70), (4, 1027), (2, 3, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dropout_mask_bit_identical(device, shape):
    M, K = math.prod(shape[:-1]), shape[-1]
    for seed, p in SEEDS_PS:
        x = torch.ones(shape, device=device)
        out = ops.native_dropout(x, p, seed)
        keep = torch_mask(seed, (M, K), p).view(shape)
        assert torch.equal((out != 0).cpu(), keep), f"mask differs for seed={int(seed)} p={p}"
        assert torch.equal(out.cpu()[keep], torch.full((int(keep.sum()),), 1 / (1 - p)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_values_and_gradient(device, dtype):
    seed, p = new_seed(), 0.25
    x = torch.randn(37, 29, device=device).to(dtype)[:, 3:]  # non-contiguous
    out = ops.native_dropout(x, p, seed)
    assert out.dtype == dtype and out.shape == x.shape
    expected = x.double().cpu() * torch_mask(seed, (37, 26), p) / (1 - p)
    assert_close_to_ref(out, expected, dtype, "x̂")
    xg = x.detach().float().requires_grad_()
    ops.native_dropout(xg, p, seed).backward(torch.ones_like(xg))
    assert torch.equal((xg.grad != 0).cpu(), torch_mask(seed, (37, 26), p))


def _strided_views(device):
    """(name, x): x viewed as [numel / K, K] by logical index whatever its strides."""
    base = torch.randn(6, 10, 14, device=device)
    return [("column-slice", base[:, :, 3:12]), ("transposed", base[0].t()), ("permuted", base.permute(2, 0, 1)),
            ("stride-2-last", base[:, :, ::2]), ("expanded", torch.randn(1, 9, device=device).expand(5, 9)),
            ("0-d", torch.tensor(1.5, device=device)), ("empty", base[:, :0])]


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_strided_x_and_dtype(device):
    """Any strides in; a contiguous x̂ out in `dtype` (x's by default); the mask of the logical [numel / K, K]."""
    seed, p = new_seed(), 0.35
    for name, x in _strided_views(device):
        K = x.shape[-1] if x.dim() else 1
        keep = torch_mask(seed, (x.numel() // max(K, 1) if K else 0, K), p).view(x.shape)
        for dtype in (None, torch.float32, torch.float64, torch.bfloat16):
            if device == "cuda" and dtype == torch.float64:
                continue  # the CUDA kernels take fp16/bf16/fp32
            out = ops.native_dropout(x, p, seed, dtype)
            want = x.dtype if dtype is None else dtype
            assert out.dtype == want and out.shape == x.shape and out.is_contiguous(), name
            expected = x.double().cpu() * keep / (1 - p)
            assert_close_to_ref(out, expected, want if want != torch.float64 else torch.float32, f"{name} {dtype}")
            assert torch.equal((out != 0).cpu(), keep & (x != 0).cpu()), f"{name} {dtype}: mask"


OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64], ids=["t=fp32", "t=fp64"])
def test_dropout_add(device, out_dtype, t_dtype):
    """out += t ⊙ m / (1 - p): computed in promote(out, t), rounded once into out; mask of t's [M, K] view."""
    seed, p = new_seed(), 0.3
    for M, K, strided in [(37, 29, False), (5, 1027, False), (3, 3, False), (0, 8, False), (19, 70, True)]:
        g = torch.Generator().manual_seed(M * K)
        t = torch.randn(M, K, generator=g, dtype=torch.float64).to(device, t_dtype)
        out0 = torch.randn(M, K, generator=g).to(device, out_dtype)
        out = out0.clone()
        if strided:  # out and t as column slices / a transposed copy: any strides
            out = torch.zeros(K, M + 3, dtype=out_dtype, device=device)[:, 1:M + 1].t()
            out.copy_(out0)
            t = t.t().contiguous().t()
        ops.native_dropout_add_(out, t, p, seed)
        acc = torch.promote_types(torch.promote_types(out_dtype, t_dtype), torch.float32)
        keep = torch_mask(seed, (M, K), p).to(device)
        expected = (out0.to(acc) + t.to(acc) * (keep.to(acc) * (1 / (1 - p)))).to(out_dtype)
        torch.testing.assert_close(out, expected, rtol=0 if out_dtype == torch.float64 else None,
                                   atol=0 if out_dtype == torch.float64 else None, msg=lambda m: f"{M}x{K}: {m}")
        ones = torch.zeros(M, K, dtype=out_dtype, device=device)
        ops.native_dropout_add_(ones, torch.ones(M, K, dtype=t_dtype, device=device), p, seed)
        assert torch.equal((ones != 0).cpu(), keep.cpu()), f"{M}x{K}: mask"


def test_dropout_op_errors():
    seed = new_seed()
    with pytest.raises(RuntimeError, match=r"dropout_add_: t must have out's shape \[4, 5\], got \[4, 6\]"):
        ops.native_dropout_add_(torch.zeros(4, 5), torch.zeros(4, 6), 0.1, seed)
    with pytest.raises(RuntimeError, match="dropout_add_: t must be float32 or float64, got BFloat16"):
        ops.native_dropout_add_(torch.zeros(4, 5), torch.zeros(4, 5, dtype=torch.bfloat16), 0.1, seed)
    with pytest.raises(RuntimeError, match="dropout_add_: out must be float16, bfloat16, float32 or float64"):
        ops.native_dropout_add_(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 5), 0.1, seed)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # out overlapping itself
        ops.native_dropout_add_(torch.zeros(1, 5).expand(4, 5), torch.zeros(4, 5), 0.1, seed)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.native_dropout_add_(torch.zeros(4, 5), torch.zeros(4, 5), 1.0, seed)
    with pytest.raises(RuntimeError, match="seed must be None or a CPU int64 tensor"):
        ops.native_dropout_mask(torch.tensor([1.0]), 3, 4, 0.1)
    with pytest.raises(RuntimeError, match="dropout_mask: M and K must be >= 0, got M=-1"):
        ops.native_dropout_mask(seed, -1, 4, 0.1)
    with pytest.raises(RuntimeError, match="x must be floating point"):
        ops.native_dropout(torch.ones(3, dtype=torch.int32), 0.1, seed)
    with pytest.raises(RuntimeError, match="dtype must be a floating-point dtype"):
        ops.native_dropout(torch.ones(3), 0.1, seed, torch.int64)
    if not NATIVE.WITH_CUDA:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            ops.native_dropout_mask(seed, 3, 4, 0.1, torch.device("cuda"))


# ---------------------------------------------------------------------------------------------------
# Single-adapter fused LoRA linear vs. the float64 reference (the cases of test_lora_linear.py)
# ---------------------------------------------------------------------------------------------------

def make_inputs(M, K, N, R, dtype, lora_dtype=None, device="cpu", bias=True, x_noncontig=False):
    g = torch.Generator().manual_seed(1000 * M + 10 * K + N + R)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(M, K + 7) if x_noncontig else rnd(M, K)
    W, A, B = rnd(N, K) / math.sqrt(K), rnd(R, K) / math.sqrt(K), rnd(N, R)
    b = rnd(N) if bias else None
    dy = rnd(M, N)
    x = x.to(device, dtype)
    if x_noncontig:  # a column slice of a wider tensor: row stride != K
        x = x[:, 3:K + 3]
    lora_dtype = lora_dtype or dtype
    cast = lambda t, dt: None if t is None else t.to(device, dt)
    return x, cast(W, dtype), cast(b, dtype), cast(A, lora_dtype), cast(B, lora_dtype), cast(dy, dtype)


def reference_outputs(x, W, b, A, B, dy, scaling, p, seed):
    M, K = x.shape
    mask = torch_mask(seed, (M, K), p) if seed is not None else None
    c = lambda t: None if t is None else t.detach().to(F64).cpu()
    y, S = ref.lora_linear_forward(c(x), c(W), c(b), c(A), c(B), scaling, mask, p)
    dx, dA, dB = ref.lora_linear_backward(c(dy), c(x), c(W), c(A), c(B), scaling, mask, p)
    return y, S, dx, dA, dB


def check_native(device, M, K, N, R, dtype, lora_dtype=None, p=0.0, bias=True, x_noncontig=False,
                 need=(True, True, True), scaling=0.75, entry="op"):
    """Forward + backward through the registered op (backend="native") or the native op's own autograd."""
    x, W, b, A, B, dy = make_inputs(M, K, N, R, dtype, lora_dtype, device, bias, x_noncontig)
    seed = new_seed() if p > 0 else None
    x, A, B = (t.detach().requires_grad_(n) for t, n in zip((x, A, B), need))
    _poison_allocator(device, 4 * max(M * max(K, N), K * R, N * R))
    if entry == "op":
        y, S = ops.lora_linear_fwd(x, W, b, A, B, scaling, p, seed, "native")
    else:
        y, S = ops.native_lora_linear_fwd(x, W, b, A, B, scaling, p, seed)
    y_ref, S_ref, dx_ref, dA_ref, dB_ref = reference_outputs(x, W, b, A, B, dy, scaling, p, seed)
    assert y.dtype == dtype and y.shape == (M, N) and S.dtype == torch.float32 and S.shape == (M, R)
    assert_close_to_ref(y, y_ref, dtype, "y")
    assert_close_to_ref(S, S_ref, dtype, "S")
    if any(need):
        y.backward(dy)
    for name, t, r, want in (("dx", x, dx_ref, need[0]), ("dA", A, dA_ref, need[1]), ("dB", B, dB_ref, need[2])):
        if not want:
            assert t.grad is None
            continue
        assert t.grad.dtype == t.dtype, f"{name} dtype {t.grad.dtype} != {t.dtype}"
        assert_close_to_ref(t.grad, r, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora_fp32", [False, True], ids=["lora=x", "lora=fp32"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("entry", ["op", "native"])
def test_lora_linear_dtypes(device, dtype, lora_fp32, p, entry):
    check_native(device, 37, 64, 48, 8, dtype, torch.float32 if lora_fp32 else None, p, entry=entry)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 8, 16, 40, 64, 128])
def test_lora_linear_ranks(device, rank):
    check_native(device, 24, 48, 40, rank, torch.float32, p=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,K,N", [(1, 17, 9), (16, 64, 48), (67, 130, 93), (200, 70, 40), (1, 4096, 64)],
                         ids=lambda v: str(v))
def test_lora_linear_shapes(device, M, K, N):
    """Odd sizes take the scalar paths; (1, 4096, 64) takes the split-K shrink on a GPU."""
    check_native(device, M, K, N, 8, torch.float32, p=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_empty_batch(device):
    check_native(device, 0, 32, 24, 4, torch.float32, p=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_noncontiguous_nobias(device):
    check_native(device, 30, 40, 24, 6, torch.float32, p=0.2, bias=False, x_noncontig=True)
    check_native(device, 30, 40, 24, 6, torch.bfloat16, bias=False, x_noncontig=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["dx", "dA", "dB", "dA+dB"])
def test_lora_linear_partial_grads(device, need):
    check_native(device, 20, 24, 16, 4, torch.float32, p=0.3, need=need)
    x, W, b, A, B, dy = make_inputs(20, 24, 16, 4, torch.float32, device=device)
    S = ops.native_lora_linear_fwd(x, W, b, A, B, 1.0, 0.0, None)[1]
    grads = ops.native_lora_linear_bwd(dy, x, W, A, B, S, 1.0, 0.0, None, *need)
    for g, t, want in zip(grads, (x, A, B), need):
        assert g.shape == (t.shape if want else (0,)) and g.dtype == t.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,K", [(45, 40), (9, 43), (3, 1040)], ids=["vector", "scalar", "2-tiles-1040-ranks"])
def test_kernel_mask_is_the_regenerated_mask(device, M, K):
    """x = 1, A = I: S = x̂ Aᵀ is the mask / (1 - p), bit for bit; dx = (dS A) ⊙ m / (1 - p) uses it too.
    On a GPU: the shrink's vector and scalar fills, a K longer than one tile, ranks far beyond one per warp."""
    p = 0.3
    seed = new_seed()
    x, A, B = torch.ones(M, K, device=device), torch.eye(K, device=device), torch.zeros(3, K, device=device)
    _, S = ops.native_lora_linear_fwd(x, torch.zeros(3, K, device=device), None, A, B, 1.0, p, seed)
    keep = torch_mask(seed, (M, K), p)
    torch.testing.assert_close(S.cpu(), keep.float() / (1 - p), rtol=1e-6, atol=0)
    B = torch.ones(3, K, device=device)
    dx, _, _ = ops.native_lora_linear_bwd(torch.ones(M, 3, device=device), x, torch.zeros(3, K, device=device), A,
                                          B, S, 1.0, p, seed, True, False, False)
    assert torch.equal((dx != 0).cpu(), keep)


def test_gradcheck_native_autograd():
    """The autograd formula registered for native_lora_linear_fwd, in float64 on CPU, with and without dropout."""
    x, W, b, A, B, _ = make_inputs(5, 7, 6, 3, F64)
    for seed in (None, new_seed()):
        fn = lambda x, A, B: ops.native_lora_linear_fwd(x, W, b, A, B, 0.5, 0.4, seed)[0]
        assert torch.autograd.gradcheck(fn, tuple(t.detach().requires_grad_() for t in (x, A, B)))


def test_public_function_native_backend():
    """lk.lora_linear(backend="native"): leading dims, training dropout drawn from the default generator."""
    x, W, b, A, B, _ = make_inputs(12, 16, 10, 4, torch.float32)
    x3 = x.view(3, 4, 16)
    torch.manual_seed(5)
    y = lk.lora_linear(x3, W, b, A, B, 0.5, dropout_p=0.3, training=True, backend="native")
    torch.manual_seed(5)
    y_torch = lk.lora_linear(x3, W, b, A, B, 0.5, dropout_p=0.3, training=True, backend="torch")
    assert y.shape == (3, 4, 10)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Multi-adapter ops vs. the per-token float64 reference (the cases of test_multi_lora.py)
# ---------------------------------------------------------------------------------------------------

def _assignment(case, T, L, gen):
    if case == "random":
        return torch.randint(-1, L, (T,), generator=gen)
    if case == "one":
        return torch.full((T,), L - 2, dtype=torch.int64)
    if case == "distinct":
        return torch.randperm(L, generator=gen)[:T]
    if case == "sparse":
        return torch.tensor([0, 3, -1])[torch.randint(0, 3, (T,), generator=gen)]
    if case == "none":
        return torch.full((T,), -1, dtype=torch.int64)
    if case == "sorted":
        return torch.sort(torch.randint(-1, L, (T,), generator=gen)).values
    raise ValueError(case)


def _problem(dtype, T=37, in_f=40, widths=(24,), L=6, R=12, ranks=(1, 12, 5, 7, 3, 9), seed=0, case="random",
             device="cpu"):
    """Fresh random inputs; A/B padding beyond each slot's rank is garbage on purpose."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    A = [(torch.randn(L, R, in_f, generator=g) / in_f ** 0.5).to(device, dtype) for _ in widths]
    B = [(torch.randn(L, n, R, generator=g) / R ** 0.5).to(device, dtype) for n in widths]
    W = (torch.randn(sum(widths), in_f, generator=g) / in_f ** 0.5).to(device, dtype)
    bias = torch.randn(sum(widths), generator=g).to(device, dtype)
    scalings = (torch.rand(L, generator=g) + 0.5).to(device)
    rk = torch.tensor(ranks[:L], dtype=torch.int32, device=device) if ranks is not None else None
    ta = _assignment(case, T, L, g)
    return x, A, B, W, bias, scalings, rk, ta


def _f64(ts):
    return [t.double().cpu() for t in ts]


def _cpu(t):
    return None if t is None else t.cpu()


def _close(out, expected, dtype, what):
    atol, rtol = MULTI_TOL[dtype]
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    torch.testing.assert_close(out, expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T", [("random", 37), ("one", 21), ("distinct", 5), ("sparse", 19), ("none", 9),
                                    ("random", 1), ("random", 0), ("sorted", 150)])
def test_shrink(device, dtype, case, T):
    x, A, B, *_, ranks, ta = _problem(dtype, T=T, case=case, widths=(24, 8), device=device)
    batch = LoRABatch.from_token_adapters(ta, 6, device=device)
    xs = torch.zeros(T, 2 * x.shape[1], dtype=dtype, device=device)[:, ::2]  # stride 2 along in
    xs.copy_(x)
    _poison_allocator(device, 4 * T * 24)
    S = lora_shrink(xs, A, batch, ranks, backend="native")
    assert S.shape == (T, 2 * 12) and S.dtype == torch.float32
    _close(S, ref.multi_lora_shrink(x.double().cpu(), _f64(A), ta, _cpu(ranks)), dtype, "S")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous_y", [False, True], ids=["y-strided", "y-contig"])
@pytest.mark.parametrize("case,T,widths", [("random", 37, (24, 8, 8)), ("distinct", 6, (40,)), ("one", 17, (24, 8)),
                                           ("sparse", 30, (8, 24, 16, 8, 8)), ("random", 1, (24,)),
                                           ("random", 0, (24, 8))])
def test_expand(device, dtype, contiguous_y, case, T, widths):
    x, A, B, *_, scalings, ranks, ta = _problem(dtype, T=T, case=case, widths=widths, device=device)
    batch = LoRABatch.from_token_adapters(ta, 6, device=device)
    S = ref.multi_lora_shrink(x.double().cpu(), _f64(A), ta, None).float().to(device)  # garbage past ranks
    N = sum(widths)
    y0 = torch.randn(T, N + 7).to(device, dtype)
    big = torch.full((T, 2 * (N + 7)), float("nan"), dtype=dtype, device=device)
    y = big[:, : N + 7] if contiguous_y else big[:, ::2]  # NaN around y must stay NaN
    y.copy_(y0)
    out = lora_expand(S, B, batch, y, scalings, ranks, y_offset=3, backend="native")
    assert out is y
    expected = y0.double().cpu().clone()
    expected[:, 3:3 + N] += ref.multi_lora_expand_delta(S.double().cpu(), _f64(B), scalings.cpu(), ta, _cpu(ranks))
    _close(y, expected, dtype, "y")
    rest = big[:, N + 7:] if contiguous_y else big[:, 1::2]
    assert torch.isnan(rest).all()
    assert torch.equal(y[(ta < 0).to(device)], y0[(ta < 0).to(device)]), "-1 tokens must be left untouched"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T,widths,has_bias", [
    ("random", 37, (24,), True), ("distinct", 6, (24, 8, 8), False), ("one", 70, (24,), False),
    ("sparse", 13, (16, 8), True), ("none", 9, (24,), True), ("random", 1, (24, 8, 8), True),
    ("random", 0, (24,), True), ("sorted", 150, (24, 8, 8), True)])
def test_multi_lora_linear(device, dtype, case, T, widths, has_bias):
    x, A, B, W, bias, scalings, ranks, ta = _problem(dtype, T=T, case=case, widths=widths, device=device)
    bias = bias if has_bias else None
    batch = LoRABatch.from_token_adapters(ta, 6, device=device)
    _poison_allocator(device, 4 * T * sum(widths))
    y = multi_lora_linear(x.view(1, T, x.shape[1]), W, bias, A, B, scalings, batch, ranks, backend="native")
    assert y.shape == (1, T, sum(widths)) and y.dtype == dtype
    expected = ref.multi_lora_linear_forward(x.double().cpu(), W.double().cpu(),
                                             None if bias is None else bias.double().cpu(), _f64(A), _f64(B),
                                             scalings.cpu(), ta, _cpu(ranks))
    _close(y[0], expected, dtype, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_multi_rank_one_full_rank_many_slices(device):
    """ranks=None uses the whole R; rank 1 everywhere; R = 70 (not a multiple of 8 or 16); six slices."""
    for R, ranks, widths in [(12, None, (24,)), (5, (1,) * 6, (24, 8)), (70, (70, 1, 65, 64, 17, 33), (24,)),
                             (16, (16, 8, 0, 3, 9, 16), (8, 16, 8, 8, 24, 8))]:
        x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=23, R=R, ranks=ranks, widths=widths, device=device)
        batch = LoRABatch.from_token_adapters(ta, 6, device=device)
        y = multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend="native")
        _close(y, ref.multi_lora_linear_forward(x.double().cpu(), W.double().cpu(), bias.double().cpu(), _f64(A),
                                                _f64(B), sc.cpu(), ta, _cpu(rk)), torch.float32, f"R={R}")
        S = lora_shrink(x, A, batch, rk, backend="native")
        _close(S, ref.multi_lora_shrink(x.double().cpu(), _f64(A), ta, _cpu(rk)), torch.float32, f"S R={R}")


@pytest.mark.parametrize("device", DEVICES)
def test_multi_sorted_and_scattered_agree(device):
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=40, case="sorted", widths=(24, 8), device=device)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    mk = lambda t: LoRABatch.from_token_adapters(t, 6, device=device)
    y_sorted = multi_lora_linear(x, W, bias, A, B, sc, mk(ta), rk, backend="native")
    y_scat = multi_lora_linear(x[perm.to(device)], W, bias, A, B, sc, mk(ta[perm]), rk, backend="native")
    torch.testing.assert_close(y_scat, y_sorted[perm.to(device)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_multi_cpu_segment_paths(dtype):
    """The CPU kernels run a slot's tokens as GEMMs when it has >= 8 of them (gathered, or one block when they are
    consecutive) and per token otherwise; every path against the float64 reference, fused and split ops."""
    # slot 0: 9 scattered tokens, slot 1: 8 consecutive, slot 2: 1 token, slot 3: 3, slot 4: 4 consecutive at the end,
    # slot 5: none; -1 tokens in between.
    ta = torch.tensor([0, 3, 0, 1, 1, 1, 1, 1, 1, 1, 1, -1, 0, 2, 0, 3, 0, -1, 0, 3, 0, 0, 0, 4, 4, 4, 4])
    assert [int((ta == l).sum()) for l in range(6)] == [9, 8, 1, 3, 4, 0]
    x, A, B, W, bias, sc, rk, _ = _problem(dtype, T=ta.numel(), widths=(24, 8), ranks=(12, 5, 7, 3, 9, 1))
    bt = LoRABatch.from_token_adapters(ta, 6).op_args()  # the ops themselves: the Python layer refuses fp64
    f64 = lambda t: t.double()
    y = ops.native_multi_lora_linear(x, W, bias, A, B, sc, *bt, rk)
    _close(y, ref.multi_lora_linear_forward(f64(x), f64(W), f64(bias), _f64(A), _f64(B), sc, ta, rk), dtype, "y")
    S = ops.native_lora_shrink(x, A, *bt, rk)
    _close(S, ref.multi_lora_shrink(f64(x), _f64(A), ta, rk), dtype, "S")
    y0 = torch.randn(ta.numel(), 40).to(dtype)
    y1 = y0.clone()
    ops.native_lora_expand(S, B, *bt, y1, sc, rk, 5)
    expected = f64(y0)
    expected[:, 5:37] += ref.multi_lora_expand_delta(f64(S), _f64(B), sc, ta, rk)
    _close(y1, expected, dtype, "expand y")


def test_multi_cpu_rejects_inconsistent_batch():
    """The CPU kernels read the grouping tensors on the host: ones that do not group token_adapter raise."""
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=12, widths=(8,), case="one")
    ta_i, sid, ss, sl, *tiles = LoRABatch.from_token_adapters(ta, 6).op_args()
    with pytest.raises(RuntimeError, match=r"do not cover the 12 tokens of slot 4"):
        ops.native_lora_shrink(x, A, ta_i, sid, ss, torch.zeros_like(sl), *tiles, rk)
    bad = sid.clone()
    bad[1] = bad[0]
    with pytest.raises(RuntimeError, match=r"sorted_token_ids\[1\]=0 is not a token of slot 4 or appears twice"):
        ops.native_multi_lora_linear(x, W, bias, A, B, sc, ta_i, bad, ss, sl, *tiles, rk)


# ---------------------------------------------------------------------------------------------------
# Registrations: opcheck (schema, fake tensors, autograd), torch.compile, every op on CPU and CUDA keys
# ---------------------------------------------------------------------------------------------------

def test_every_native_op_registered_on_cpu_and_cuda():
    """In a CPU-only build the CUDA kernels are stubs that raise a build hint; NATIVE_OPS lists every op."""
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_kernels::native_"))
    assert registered == sorted("lora_kernels::" + n for n in NATIVE_OPS)
    for name in registered:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"
    assert NATIVE.WITH_CUDA in (0, 1)


def test_opcheck_lora_linear_ops():
    x, W, b, A, B, dy = make_inputs(9, 16, 12, 3, torch.float32)
    seed = new_seed()
    for s in (None, seed):
        args = (x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_(), 0.5, 0.25, s)
        torch.library.opcheck(ops.native_lora_linear_fwd, args)
        S = ops.native_lora_linear_fwd(*[t.detach() if isinstance(t, torch.Tensor) else t for t in args])[1]
        for need in ((True, True, True), (False, True, False)):
            torch.library.opcheck(ops.native_lora_linear_bwd,
                                  (dy, x.detach(), W, A.detach(), B.detach(), S, 0.5, 0.25, s, *need))
    torch.library.opcheck(ops.native_dropout, (torch.randn(5, 6, requires_grad=True), 0.3, seed))
    torch.library.opcheck(ops.native_dropout, (torch.randn(5, 6, requires_grad=True), 0.3, seed, torch.float64))
    torch.library.opcheck(ops.native_dropout_add_, (torch.randn(5, 6, dtype=torch.bfloat16), torch.randn(5, 6), 0.3,
                                                    seed))
    torch.library.opcheck(ops.native_dropout_mask, (seed, 5, 7, 0.3))


def test_opcheck_multi_ops():
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=9, widths=(8, 16))
    bt = LoRABatch.from_token_adapters(ta, 6).op_args()
    S = ops.native_lora_shrink(x, A, *bt, rk)
    torch.library.opcheck(ops.native_lora_shrink, (x, A, *bt, rk))
    torch.library.opcheck(ops.native_lora_expand, (S, B, *bt, torch.randn(9, 26), sc, rk, 2))
    torch.library.opcheck(ops.native_multi_lora_linear, (x, W, bias, A, B, sc, *bt, None))


def test_compile_fullgraph():
    """The native ops trace through their fake kernels; backward through the registered autograd."""
    x, W, b, A, B, dy = make_inputs(11, 16, 12, 4, torch.float32)
    seed = new_seed()

    def f(x, A, B):
        y, _ = ops.native_lora_linear_fwd(x, W, b, A, B, 0.5, 0.2, seed)
        return y

    torch._dynamo.reset()
    args = [t.detach().requires_grad_() for t in (x, A, B)]
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    y.backward(dy)
    args_e = [t.detach().requires_grad_() for t in (x, A, B)]
    y_e = f(*args_e)
    y_e.backward(dy)
    torch.testing.assert_close(y, y_e)
    for a, e in zip(args, args_e):
        torch.testing.assert_close(a.grad, e.grad)


# ---------------------------------------------------------------------------------------------------
# Errors: the C++ checks name the argument and the expected shape
# ---------------------------------------------------------------------------------------------------

def test_native_bad_input():
    x, W, b, A, B, dy = make_inputs(4, 8, 6, 2, torch.float32)
    fwd = lambda **kw: ops.native_lora_linear_fwd(**{**dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, scaling=1.0,
                                                            dropout_p=0.0, seed=None), **kw})
    cases = [(dict(x=torch.randn(4, 9)), r"x must have shape \[M, in=8\]"),
             (dict(x=torch.randn(2, 4, 8)), r"x must have shape \[M, in\]"),
             (dict(lora_A=torch.randn(2, 7)), r"lora_A must have shape \[r, in=8\]"),
             (dict(lora_B=torch.randn(6, 3)), r"lora_B must have shape \[out=6, r=2\]"),
             (dict(bias=torch.randn(5)), r"bias must be None or have shape \[out=6\]"),
             (dict(weight=W.double()), "weight dtype"),
             (dict(lora_B=B.double()), "one dtype"),
             (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
             (dict(scaling=float("inf")), "scaling must be finite"),
             (dict(seed=torch.tensor([1.0])), "seed must be None or a CPU int64 tensor"),
             (dict(seed=torch.tensor([1, 2])), "seed must be None or a CPU int64 tensor")]
    for kw, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fwd(**kw)
    S = fwd()[1]
    with pytest.raises(RuntimeError, match=r"dy must have shape \[M=4, out=6\]"):
        ops.native_lora_linear_bwd(dy[:, :5], x, W, A, B, S, 1.0, 0.0, None, True, True, True)
    with pytest.raises(RuntimeError, match=r"S must have shape \[M=4, r=2\]"):
        ops.native_lora_linear_bwd(dy, x, W, A, B, S[:3], 1.0, 0.0, None, True, True, True)

    xm, Am, Bm, Wm, bm, sc, rk, ta = _problem(torch.float32, T=7, widths=(24, 8))
    bt = LoRABatch.from_token_adapters(ta, 6).op_args()
    with pytest.raises(RuntimeError, match=r"A_stacks\[1\] must have shape \[L=6, R=12, in=40\]"):
        ops.native_lora_shrink(xm, [Am[0], Am[1][:, :, :39]], *bt, rk)
    with pytest.raises(RuntimeError, match=r"token_adapter must be an int32 tensor of shape \[T=7\]"):
        ops.native_lora_shrink(xm, Am, bt[0].long(), *bt[1:], rk)
    with pytest.raises(RuntimeError, match=r"ranks must be an int32 tensor of shape \[L=6\]"):
        ops.native_lora_shrink(xm, Am, *bt, rk[:3])
    with pytest.raises(RuntimeError, match=r"token_adapter ids must lie in \[-1, num_slots=6\)"):
        ops.native_lora_shrink(xm, Am, torch.full((7,), 6, dtype=torch.int32), *bt[1:], rk)
    S = ops.native_lora_shrink(xm, Am, *bt, rk)
    with pytest.raises(RuntimeError, match=r"S must have shape \[T=7, NS\*R=24\]"):
        ops.native_lora_expand(S[:, :20], Bm, *bt, torch.zeros(7, 32), sc, rk, 0)
    with pytest.raises(RuntimeError, match=r"y must have shape \[T=7, >= y_offset \+ sum\(out\)=34\]"):
        ops.native_lora_expand(S, Bm, *bt, torch.zeros(7, 32), sc, rk, 2)
    with pytest.raises(RuntimeError, match=r"scalings must be a float tensor of shape \[L=6\]"):
        ops.native_lora_expand(S, Bm, *bt, torch.zeros(7, 32), sc[:2], rk, 0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[out=sum\(B out\)=32, in=40\]"):
        ops.native_multi_lora_linear(xm, Wm[:30], bm, Am, Bm, sc, *bt, rk)
    with pytest.raises(RuntimeError, match=r"B_stacks must be 2 tensors"):
        ops.native_multi_lora_linear(xm, Wm, bm, Am, Bm[:1], sc, *bt, rk)


def test_cuda_stub_in_cpu_only_build():
    """A CPU-only build answers CUDA calls with how to rebuild, not the dispatcher's generic error."""
    if NATIVE.WITH_CUDA:
        pytest.skip("the extension was built with CUDA")
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device to create CUDA tensors (the stub registration is checked above)")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        ops.native_dropout(torch.ones(2, device="cuda"), 0.5, new_seed())


def test_build_check_script_on_this_build():
    """scripts/check_native_build.py (the CUDA CI step's checker) on the in-tree CPU build."""
    so = [f for f in os.listdir(os.path.join(ROOT, "lora_kernels")) if f.startswith("_C") and f.endswith(".so")]
    if len(so) != 1 or not os.path.samefile(os.path.join(ROOT, "lora_kernels", so[0]), NATIVE.__file__):
        pytest.skip(f"the loaded extension {NATIVE.__file__} is not the in-tree build")
    flags = [] if NATIVE.WITH_CUDA else ["--no-cuda"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_native_build.py"), ROOT, *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"all {len(NATIVE_OPS)} native ops have" in r.stdout


# ---------------------------------------------------------------------------------------------------
# GPU only: more than 2^31 elements, CUDA graphs
# ---------------------------------------------------------------------------------------------------

def _mask_rows(seed: int, rows: torch.Tensor, K: int, p: float) -> torch.Tensor:
    """The keep-mask of the given rows of an [M, K] activation (dropout.py's formula, for huge M)."""
    K4 = (K + 3) // 4
    counters = rows.view(-1, 1) * K4 + torch.arange(K4, device=rows.device)
    bits = torch.stack(philox4x32(seed, counters), dim=-1).view(rows.numel(), K4 * 4)[:, :K]
    return (bits >> 1) >= keep_threshold(p)


def check_rows_and_reductions(device, M, K, N=16, R=8, p=0.25, dt=torch.bfloat16, chunk=4096):
    """Forward + backward; y, S, dx checked on a few rows (incl. the last), dA / dB over all rows in chunks.

    The reference never materialises an [M, K] float64 tensor or the full mask, so M · K can pass 2^31."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dt, generator=g)
    W = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).to(dt)
    A = (torch.randn(R, K, device=device, generator=g) / K ** 0.5).to(dt)
    B = torch.randn(N, R, device=device, generator=g).to(dt)
    dy = torch.randn(M, N, device=device, generator=g).to(dt)
    seed = new_seed()
    y, S = ops.native_lora_linear_fwd(x, W, None, A, B, 0.5, p, seed)
    dx, dA, dB = ops.native_lora_linear_bwd(dy, x, W, A, B, S, 0.5, p, seed, True, True, True)
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device=device)
    keep = _mask_rows(int(seed), rows, K, p)
    xh = x[rows].double() * keep / (1 - p)
    S_ref = xh @ A.double().T
    y_ref = x[rows].double() @ W.double().T + 0.5 * S_ref @ B.double().T
    dS = 0.5 * dy[rows].double() @ B.double()
    dx_ref = dy[rows].double() @ W.double() + (dS @ A.double()) * keep / (1 - p)
    assert_close_to_ref(S[rows], S_ref.cpu(), dt, "S")
    assert_close_to_ref(y[rows], y_ref.cpu(), dt, "y")
    assert_close_to_ref(dx[rows], dx_ref.cpu(), dt, "dx")
    dA_ref = torch.zeros(R, K, dtype=F64, device=device)
    dB_ref = 0.5 * dy.double().T @ S.double()
    for start in range(0, M, chunk):
        rs = torch.arange(start, min(M, start + chunk), device=device)
        xh = x[rs].double() * _mask_rows(int(seed), rs, K, p) / (1 - p)
        dA_ref += (0.5 * dy[rs].double() @ B.double()).T @ xh
    assert_close_to_ref(dA, dA_ref.cpu(), dt, "dA")
    assert_close_to_ref(dB, dB_ref.cpu(), dt, "dB")


def check_multi_rows(device, T, in_f, N, L=4, R=16, dt=torch.bfloat16):
    """multi_lora_linear checked on a few rows (incl. the last) against the per-token reference."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, in_f, device=device, generator=g).to(dt)
    W = (torch.randn(N, in_f, device=device, generator=g) / in_f ** 0.5).to(dt)
    A = (torch.randn(L, R, in_f, device=device, generator=g) / in_f ** 0.5).to(dt)
    B = (torch.randn(L, N, R, device=device, generator=g) / R ** 0.5).to(dt)
    sc = torch.rand(L, device=device, generator=g) + 0.5
    ta = torch.randint(-1, L, (T,), device=device, generator=g)
    y = multi_lora_linear(x, W, None, A, B, sc, LoRABatch.from_token_adapters(ta, L), backend="native")
    rows = [0, T // 2, T - 2, T - 1]
    expected = ref.multi_lora_linear_forward(x[rows].double().cpu(), W.double().cpu(), None, [A.double().cpu()],
                                             [B.double().cpu()], sc.cpu(), ta[rows].cpu())
    _close(y[rows], expected, dt, "y")


def test_row_and_reduction_checks_on_cpu():
    """The same checks as the > 2^31-element GPU tests, at CPU sizes (this validates the checks themselves)."""
    check_rows_and_reductions("cpu", 301, 72, chunk=64)
    check_multi_rows("cpu", 203, 24, 40)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_more_than_2_31_elements():
    """x and dx of 2^16 + 3 rows × 32768 (> 2^31 elements, bf16): 64-bit offsets and dropout counters past 2^31
    in the shrink, the masked expand (dx) and the outer-product reduction (dA)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    M, K = 2**16 + 3, 32768
    assert M * K > 2**31
    check_rows_and_reductions("cuda", M, K)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_multi_expand_more_than_2_31_elements():
    """multi_lora_linear writing y of 2^16 + 3 tokens × 32768 (> 2^31 elements): the expand's 64-bit offsets."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs ~16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    T, N = 2**16 + 3, 32768
    assert T * N > 2**31
    check_multi_rows("cuda", T, 64, N)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    """The native ops launch on the current stream without host syncs: capture, then replay on new inputs."""
    x, A, B, W, bias, sc, rk, ta = _problem(torch.bfloat16, T=16, widths=(24, 8), device="cuda")
    batch = LoRABatch.from_token_adapters(ta, 6, device="cuda")
    xl, Wl, bl, Al, Bl, _ = make_inputs(16, 64, 48, 8, torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend="native")
        ops.native_lora_linear_fwd(xl, Wl, bl, Al, Bl, 0.5, 0.0, None)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend="native")
        yl, _ = ops.native_lora_linear_fwd(xl, Wl, bl, Al, Bl, 0.5, 0.0, None)
    x.copy_(torch.randn_like(x))
    xl.copy_(torch.randn_like(xl))
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.multi_lora_linear_forward(x.double().cpu(), W.double().cpu(), bias.double().cpu(), _f64(A),
                                             _f64(B), sc.cpu(), batch.token_adapter.cpu(), rk.cpu())
    _close(y, expected, torch.bfloat16, "graph replay y")
    y_ref, *_ = reference_outputs(xl, Wl, bl, Al, Bl, torch.zeros(16, 48), 0.5, 0.0, None)
    assert_close_to_ref(yl, y_ref, torch.bfloat16, "graph replay lora_linear y")
