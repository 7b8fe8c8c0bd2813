"""Multi-adapter ops (lora_shrink / lora_expand / multi_lora_linear), LoRABatch and MultiLoRALinear vs. the
per-token float64 loops in lora_kernels.reference. Triton runs under the interpreter on CPU (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import pytest
import torch

from lora_kernels import reference as ref
from lora_kernels.backends import available_backends
from lora_kernels.layers.multi_lora import MultiLoRALinear
from lora_kernels.ops.multi_lora import (LoRABatch, lora_expand, lora_expand_op, lora_shrink, lora_shrink_op,
                                         multi_lora_linear, multi_lora_linear_op, num_tiles, tile_block_m)

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("triton", id="triton", marks=pytest.mark.skipif(
                "triton" not in available_backends("cpu"),
                reason="Triton on CPU needs TRITON_INTERPRET=1 set before lora_kernels is imported")),
            pytest.param("native", id="native", marks=pytest.mark.skipif(
                "native" not in available_backends("cpu"),
                reason="the lora_kernels._C extension is not built (pip install --no-build-isolation -e .)"))]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
# (atol, rtol) of outputs in each dtype vs. the float64 reference, for O(1) values.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fill every kernel-allocated output with NaN first: an element the kernels skip fails the test."""
    try:
        import lora_kernels.kernels.multi_lora as k
    except ImportError:  # no triton: only the torch backend runs
        return
    monkeypatch.setattr(k, "POISON_OUTPUTS", True)


def _assignment(case: str, T: int, L: int, gen: torch.Generator) -> torch.Tensor:
    if case == "random":        # mixed, with -1 tokens
        return torch.randint(-1, L, (T,), generator=gen)
    if case == "one":           # every token on one adapter
        return torch.full((T,), L - 2, dtype=torch.int64)
    if case == "distinct":      # decode-like: every token on a different adapter, scattered
        return torch.randperm(L, generator=gen)[:T]
    if case == "sparse":        # empty segments between used slots
        return torch.tensor([0, 3, -1])[torch.randint(0, 3, (T,), generator=gen)]
    if case == "none":          # base model only
        return torch.full((T,), -1, dtype=torch.int64)
    if case == "sorted":        # prefill-like: long runs per adapter
        return torch.sort(torch.randint(-1, L, (T,), generator=gen)).values
    raise ValueError(case)


def _problem(dtype, T=37, in_f=40, widths=(24,), L=6, R=12, ranks=(1, 12, 5, 7, 3, 9), seed=0, case="random"):
    """Fresh random inputs with O(1) outputs; A/B padding beyond each slot's rank is garbage on purpose."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    A = [(torch.randn(L, R, in_f, generator=g) / in_f ** 0.5).to(dtype) for _ in widths]
    B = [(torch.randn(L, n, R, generator=g) / R ** 0.5).to(dtype) for n in widths]
    W = (torch.randn(sum(widths), in_f, generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(sum(widths), generator=g).to(dtype)
    scalings = torch.rand(L, generator=g) + 0.5
    rk = torch.tensor(ranks[:L], dtype=torch.int32) if ranks is not None else None
    ta = _assignment(case, T, L, g)
    return x, A, B, W, bias, scalings, rk, ta


def _f64(ts):
    return [t.double() for t in ts]


def _close(out, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------- LoRABatch

@pytest.mark.parametrize("case", ["random", "one", "distinct", "sparse", "none", "sorted"])
@pytest.mark.parametrize("T", [0, 1, 37, 200])
def test_batch_metadata(case, T):
    L = 256 if case == "distinct" else 6
    ta = _assignment(case, T, L, torch.Generator().manual_seed(T))
    b = LoRABatch.from_token_adapters(ta, L)
    NT = num_tiles(T, L)
    assert b.block_m == tile_block_m(T) and b.num_tokens == T and b.num_slots == L
    for name, n in [("token_adapter", T), ("sorted_token_ids", T), ("seg_starts", L), ("seg_lens", L),
                    ("active_slots", L), ("num_active", 1), ("tile_slot", NT), ("tile_start", NT), ("tile_end", NT)]:
        t = getattr(b, name)
        assert t.shape == (n,) and t.dtype == torch.int32, name
    key = torch.where(ta >= 0, ta, L)
    assert torch.equal(b.sorted_token_ids.long(), torch.sort(key, stable=True).indices)
    counts = [(ta == l).sum().item() for l in range(L)]
    assert b.seg_lens.tolist() == counts
    assert b.seg_starts.tolist() == [sum(counts[:l]) for l in range(L)]
    active = [l for l in range(L) if counts[l]]
    assert b.active_slots.tolist() == active + [-1] * (L - len(active)) and b.num_active.item() == len(active)
    # Tiles: one slot each, <= block_m long, covering every adapted token exactly once and no -1 token.
    covered = []
    for s, a, e in zip(b.tile_slot.tolist(), b.tile_start.tolist(), b.tile_end.tolist()):
        if s < 0:
            continue
        assert 0 < e - a <= b.block_m
        toks = b.sorted_token_ids[a:e].long()
        assert (ta[toks] == s).all()
        covered += toks.tolist()
    assert sorted(covered) == sorted(torch.nonzero(ta >= 0).flatten().tolist())


def test_batch_errors():
    with pytest.raises(ValueError, match=r"\[-1, num_slots=4\).*\[4\]"):
        LoRABatch.from_token_adapters([0, 4, -1], 4)
    with pytest.raises(ValueError, match=r"\[-2\]"):
        LoRABatch.from_token_adapters(torch.tensor([-2, 0]), 4)
    with pytest.raises(ValueError, match="num_slots"):
        LoRABatch.from_token_adapters([0], 0)
    with pytest.raises(ValueError, match=r"shape \[T\]"):
        LoRABatch.from_token_adapters(torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="integer"):
        LoRABatch.from_token_adapters(torch.zeros(3), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch_bad_ids_on_cuda_raise_before_any_kernel():
    with pytest.raises(ValueError, match=r"\[-1, num_slots=4\)"):
        LoRABatch.from_token_adapters(torch.tensor([0, 7, -1], device="cuda"), 4)
    b = LoRABatch.from_sequences([1, -1, 0], 4, num_slots=2)
    assert b.token_adapter.tolist() == [1] * 4 + [-1] * 4 + [0] * 4


# ------------------------------------------------------------------------------------------- ops vs reference

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T", [("random", 37), ("one", 21), ("distinct", 5), ("sparse", 19), ("none", 9),
                                    ("random", 1), ("random", 0), ("sorted", 150)])
def test_shrink(backend, dtype, case, T):
    x, A, B, *_, ranks, ta = _problem(dtype, T=T, case=case, widths=(24, 8))
    batch = LoRABatch.from_token_adapters(ta, 6)
    # Non-contiguous x (stride 2 along in) inside NaN: a read outside x's elements poisons S.
    xs = torch.full((T + 1, 2 * x.shape[1] + 3), float("nan"), dtype=dtype)[:T, :2 * x.shape[1]:2]
    xs.copy_(x)
    S = lora_shrink(xs, A, batch, ranks, backend=backend)
    assert S.shape == (T, 2 * 12) and S.dtype == torch.float32
    _close(S, ref.multi_lora_shrink(x.double(), _f64(A), ta, ranks), dtype, "S")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T,widths", [("random", 37, (24, 8, 8)), ("distinct", 6, (40,)), ("one", 17, (24, 8)),
                                           ("sparse", 30, (8, 24, 16, 8, 8)), ("random", 1, (24,)),
                                           ("random", 0, (24, 8))])
def test_expand(backend, dtype, case, T, widths):
    x, A, B, *_, scalings, ranks, ta = _problem(dtype, T=T, case=case, widths=widths)
    batch = LoRABatch.from_token_adapters(ta, 6)
    S_ref = ref.multi_lora_shrink(x.double(), _f64(A), ta, None).float()  # garbage columns past ranks on purpose
    # S inside NaN (beyond its last row and column): a read outside S's elements poisons y.
    S = torch.full((T + 1, S_ref.shape[1] + 16), float("nan"))[:T, :S_ref.shape[1]]
    S.copy_(S_ref)
    N = sum(widths)
    y0 = torch.randn(T, N + 7).to(dtype)
    big = torch.full((T, 2 * (N + 7)), float("nan"), dtype=dtype)
    y = big[:, ::2]  # non-contiguous y, surrounded by NaN that must stay NaN
    y.copy_(y0)
    out = lora_expand(S, B, batch, y, scalings, ranks, y_offset=3, backend=backend)
    assert out is y
    expected = y0.double().clone()
    expected[:, 3:3 + N] += ref.multi_lora_expand_delta(S_ref.double(), _f64(B), scalings, ta, ranks)
    _close(y, expected, dtype, "y")
    assert torch.isnan(big[:, 1::2]).all()
    assert torch.equal(y[ta < 0], y0[ta < 0]), "-1 tokens must be left untouched"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T,widths,has_bias", [
    ("random", 37, (24,), True), ("distinct", 6, (24, 8, 8), False), ("one", 70, (24,), False),
    ("sparse", 13, (16, 8), True), ("none", 9, (24,), True), ("random", 1, (24, 8, 8), True),
    ("random", 0, (24,), True), ("sorted", 150, (24, 8, 8), True)])
def test_multi_lora_linear(backend, dtype, case, T, widths, has_bias):
    x, A, B, W, bias, scalings, ranks, ta = _problem(dtype, T=T, case=case, widths=widths)
    bias = bias if has_bias else None
    batch = LoRABatch.from_token_adapters(ta, 6)
    y = multi_lora_linear(x.view(1, T, x.shape[1]), W, bias, A, B, scalings, batch, ranks, backend=backend)
    assert y.shape == (1, T, sum(widths)) and y.dtype == dtype
    expected = ref.multi_lora_linear_forward(x.double(), W.double(), None if bias is None else bias.double(),
                                             _f64(A), _f64(B), scalings, ta, ranks)
    _close(y[0], expected, dtype, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_one_and_full_rank(backend):
    """ranks=None uses the whole padded R; rank 1 everywhere; R not a multiple of 16; R > 64 (r-chunks)."""
    for R, ranks in [(12, None), (5, (1,) * 6), (70, (70, 1, 65, 64, 17, 33))]:
        x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=23, R=R, ranks=ranks)
        batch = LoRABatch.from_token_adapters(ta, 6)
        y = multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend=backend)
        _close(y, ref.multi_lora_linear_forward(x.double(), W.double(), bias.double(), _f64(A), _f64(B), sc, ta, rk),
               torch.float32, f"R={R}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorted_and_scattered_agree(backend):
    """The same requests in prefill order (runs per adapter) and decode order (scattered) give the same rows."""
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=40, case="sorted", widths=(24, 8))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    y_sorted = multi_lora_linear(x, W, bias, A, B, sc, LoRABatch.from_token_adapters(ta, 6), rk, backend=backend)
    y_scat = multi_lora_linear(x[perm], W, bias, A, B, sc, LoRABatch.from_token_adapters(ta[perm], 6), rk,
                               backend=backend)
    torch.testing.assert_close(y_scat, y_sorted[perm], atol=1e-5, rtol=1e-5)
    S_sorted = lora_shrink(x, A, LoRABatch.from_token_adapters(ta, 6), rk, backend=backend)
    S_scat = lora_shrink(x[perm], A, LoRABatch.from_token_adapters(ta[perm], 6), rk, backend=backend)
    torch.testing.assert_close(S_scat, S_sorted[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_slices(backend):
    """More slices than one launch takes (MAX_SLICES = 4): the rest go through extra expand launches."""
    widths = (8, 16, 8, 8, 24, 8)
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=19, widths=widths)
    batch = LoRABatch.from_token_adapters(ta, 6)
    y = multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend=backend)
    _close(y, ref.multi_lora_linear_forward(x.double(), W.double(), bias.double(), _f64(A), _f64(B), sc, ta, rk),
           torch.float32, "y")
    S = lora_shrink(x, A, batch, rk, backend=backend)
    _close(S, ref.multi_lora_shrink(x.double(), _f64(A), ta, rk), torch.float32, "S")


def test_torch_backend_float64():
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float64, T=11, widths=(8, 8))
    batch = LoRABatch.from_token_adapters(ta, 6)
    y = multi_lora_linear(x, W, bias, A, B, sc.double(), batch, rk, backend="torch")
    expected = ref.multi_lora_linear_forward(x, W, bias, A, B, sc, ta, rk)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_before_launch():
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=7, widths=(24, 8))
    batch = LoRABatch.from_token_adapters(ta, 6)
    with pytest.raises(ValueError, match=r"x must be .*\[T, in\]"):
        lora_shrink(x[0], A, batch)
    with pytest.raises(ValueError, match=r"A_stack\[0\] must have shape \[L, R, in\] with L=6"):
        lora_shrink(x, [a[:5] for a in A], batch)
    with pytest.raises(ValueError, match=r"A_stack\[0\] must have shape \[L, R, in=39\]"):
        lora_shrink(x[:, :39], A, batch)
    with pytest.raises(ValueError, match=r"batch.token_adapter must be an int32 tensor of shape \[6\]"):
        lora_shrink(x[:6], A, batch)
    with pytest.raises(ValueError, match=r"ranks must be None or an int32 tensor of shape \[L=6\]"):
        lora_shrink(x, A, batch, rk[:3])
    with pytest.raises(TypeError, match="LoRABatch"):
        lora_shrink(x, A, ta)
    S = torch.zeros(7, 24)
    with pytest.raises(ValueError, match=r"S must be a float32 tensor of shape \[T=7, NS\*R=24\]"):
        lora_expand(S[:, :20], B, batch, torch.zeros(7, 32), sc)
    with pytest.raises(ValueError, match=r"y must have shape \[T=7, >= y_offset \+ sum\(out\)=34\]"):
        lora_expand(S, B, batch, torch.zeros(7, 32), sc, y_offset=2)
    with pytest.raises(ValueError, match=r"scalings must be a float tensor of shape \[L=6\]"):
        lora_expand(S, B, batch, torch.zeros(7, 32), sc[:2])
    with pytest.raises(ValueError, match=r"weight must have shape \[out=sum\(B out\)=32, in=40\]"):
        multi_lora_linear(x, W[:30], bias, A, B, sc, batch)
    with pytest.raises(ValueError, match="same number of slices"):
        multi_lora_linear(x, W, bias, A[:1], B, sc, batch)
    with pytest.raises(ValueError, match="backend must be one of"):
        multi_lora_linear(x, W, bias, A, B, sc, batch, backend="cuda")
    if "triton" in available_backends("cpu"):
        with pytest.raises(TypeError, match=r"needs A_stack in x's dtype \(torch.bfloat16\)"):
            multi_lora_linear(x.bfloat16(), W.bfloat16(), None, A, B, sc, batch, backend="triton")


# ------------------------------------------------------------------------------------------- registration

def test_opcheck():
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=9, widths=(8, 16))
    bt = LoRABatch.from_token_adapters(ta, 6).op_args()
    S = lora_shrink_op(x, A, *bt, rk, "torch")
    torch.library.opcheck(lora_shrink_op, (x, A, *bt, rk, "torch"))
    torch.library.opcheck(lora_expand_op, (S, B, *bt, torch.randn(9, 26), sc, rk, 2, "torch"))
    torch.library.opcheck(multi_lora_linear_op, (x, W, bias, A, B, sc, *bt, None, "torch"))


def test_compile_fullgraph():
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=9, widths=(8, 16))
    batch = LoRABatch.from_token_adapters(ta, 6)

    def f(x, batch):
        return multi_lora_linear(x, W, bias, A, B, sc, batch, rk, backend="torch")

    torch._dynamo.reset()
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, batch)
    torch.testing.assert_close(y, f(x, batch))


# ------------------------------------------------------------------------------------------- MultiLoRALinear

@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_linear_layer(backend):
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 32)
    layer = MultiLoRALinear(base, max_loras=4, max_rank=8, output_slices=(24, 8), backend=backend)
    assert not any(p.requires_grad for p in layer.parameters())
    adapters = {0: (3, 0.5), 2: (8, 2.0)}
    weights = {}
    for slot, (r, s) in adapters.items():
        As = [torch.randn(r, 40) / 6, torch.randn(r, 40) / 6]
        Bs = [torch.randn(24, r), torch.randn(8, r)]
        layer.set_slot(slot, As, Bs, s)
        weights[slot] = (As, Bs, s)
    # slot 3 holds an adapter touching only the first slice, then is cleared again
    layer.set_slot(3, [torch.randn(2, 40), None], [torch.randn(24, 2), None], 1.0)
    layer.clear_slot(3)
    ta = torch.tensor([0, 2, -1, 3, 1, 0, 2, 2, -1, 0])
    x = torch.randn(2, 5, 40)
    y = layer(x, LoRABatch.from_token_adapters(ta, 4))
    xt = x.reshape(10, 40).double()
    expected = base(x.reshape(10, 40)).double()
    for t, l in enumerate(ta.tolist()):
        if l in weights:
            As, Bs, s = weights[l]
            expected[t] += s * torch.cat([B.double() @ (A.double() @ xt[t]) for A, B in zip(As, Bs)])
    torch.testing.assert_close(y.reshape(10, 32).double(), expected, atol=1e-5, rtol=1e-5)
    # Later calls take the layer's lean path (only x and the batch are checked): same result, same errors.
    batch = LoRABatch.from_token_adapters(ta, 4)
    assert torch.equal(layer(x, batch), y)
    with pytest.raises(ValueError, match=r"batch.num_tokens=10"):
        layer(x[:1], batch)
    with pytest.raises(ValueError, match=r"max_loras=4"):
        layer(x, LoRABatch.from_token_adapters(ta, 5))
    assert torch.equal(layer(x), base(x)), "without a batch the layer is the base layer"


def test_multi_lora_linear_layer_errors():
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), max_loras=2, max_rank=4)
    with pytest.raises(ValueError, match="exceeds max_rank=4"):
        layer.set_slot(0, torch.randn(5, 16), torch.randn(8, 5), 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[out=8, r=3\]"):
        layer.set_slot(0, torch.randn(3, 16), torch.randn(8, 4), 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, in=16\]"):
        layer.set_slot(0, torch.randn(3, 15), torch.randn(8, 3), 1.0)
    with pytest.raises(IndexError, match=r"\[0, max_loras=2\)"):
        layer.set_slot(2, torch.randn(3, 16), torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match="output_slices"):
        MultiLoRALinear(torch.nn.Linear(16, 8), 2, 4, output_slices=(4, 3))
    assert layer.ranks.tolist() == [0, 0] and (layer.lora_A_0 == 0).all(), "failed set_slot changed the slot"


# ------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels at real sizes)")
@pytest.mark.parametrize("case,T", [("distinct", 64), ("one", 64), ("sorted", 1000), ("random", 333)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("gpu_backend", ["triton", "native"])
def test_gpu_matches_reference(case, T, dtype, gpu_backend):
    if gpu_backend not in available_backends("cuda"):
        pytest.skip(f"backend {gpu_backend!r} is not available on cuda")
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=T, in_f=1000, widths=(512, 128, 128), L=64, R=16,
                                            ranks=tuple(range(1, 17)) * 4, case=case)
    expected = ref.multi_lora_linear_forward(x.double(), W.double(), bias.double(), _f64(A), _f64(B), sc, ta, rk)
    S_expected = ref.multi_lora_shrink(x.double(), _f64(A), ta, rk)
    batch = LoRABatch.from_token_adapters(ta.cuda(), 64)
    xd, Wd, bd, scd, rkd = (t.cuda() for t in (x, W, bias, sc, rk))
    Ad, Bd = [a.cuda() for a in A], [b.cuda() for b in B]
    y = multi_lora_linear(xd, Wd, bd, Ad, Bd, scd, batch, rkd, backend=gpu_backend)
    # in=1000 accumulates more rounding than the CPU tests' in=40; fp32 may run tf32 if the user allows it.
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), expected, atol=max(atol, 2e-3) * 4, rtol=max(rtol, 2e-3) * 4)
    S = lora_shrink(xd, Ad, batch, rkd, backend=gpu_backend)
    torch.testing.assert_close(S.double().cpu(), S_expected, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
def test_gpu_decode_step_in_cuda_graph():
    """LoRABatch construction + the fused op capture in a CUDA graph (no host sync) and replay correctly."""
    dtype, L = torch.bfloat16, 8
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=16, in_f=256, widths=(256,), L=L, R=16,
                                            ranks=(16, 8, 4, 1, 16, 8, 4, 1), case="random")
    x, W, bias, sc, rk = (t.cuda() for t in (x, W, bias, sc, rk))
    A, B = [a.cuda() for a in A], [b.cuda() for b in B]
    static_ta = ta.cuda()

    def step():
        return multi_lora_linear(x, W, bias, A, B, sc, LoRABatch.from_token_adapters(static_ta, L, check=False),
                                 rk, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    for seed in range(3):
        new_ta = torch.randint(-1, L, (16,), generator=torch.Generator().manual_seed(seed))
        static_ta.copy_(new_ta)
        graph.replay()
        # Not bitwise: split-K shrink programs add into S atomically, in no fixed order.
        torch.testing.assert_close(y_static, step())
