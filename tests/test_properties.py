"""Property-based tests (Hypothesis) against the float64 reference, on every backend this machine runs on CPU
(Triton under TRITON_INTERPRET=1): lora_linear's forward and every gradient, LoRABatch's grouping against a
plain-Python model of it, and lora_shrink / lora_expand / multi_lora_linear against the per-token loops.

Each example is a dict of plain parameters (shapes, dtypes, layouts, a seed), printed when a test fails, from
which the tensors are built deterministically. The default Hypothesis profile ("ci") is derandomized and sized
for CI; LORA_KERNELS_HYPOTHESIS_PROFILE=long runs 25x the examples with fresh seeds (see tests/conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need `hypothesis` (the `test` extra)")
from hypothesis import given, settings, strategies as st  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import reference as ref  # noqa: E402
from lora_kernels.ops.multi_lora import LoRABatch, num_tiles, tile_block_m  # noqa: E402

from conftest import TOL, hypothesis_examples  # noqa: E402
from test_lora_linear import reference_outputs, run_op  # noqa: E402

F64 = torch.float64
NAN = float("nan")
BACKENDS = lk.available_backends("cpu")
# Triton-based backends ("triton", "composite", ...) run in the interpreter, ~1000x slower than "torch" and
# "native": they get smaller problems.
FAST = {"torch", "native"}
# Backends other than "torch" take 16/32-bit activations, and adapters in x's dtype (lora_linear: or fp32).
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = LOW_DTYPES + [F64]


@pytest.fixture(autouse=True, scope="module")
def _poison_outputs():
    """Every Triton output buffer starts as NaN, so an element a kernel fails to write fails the test.
    (Module-scoped: Hypothesis re-runs a test body many times under one function-scoped fixture.)"""
    try:
        from lora_kernels.kernels import lora_linear as k1, multi_lora as k2
    except ImportError:  # no triton: nothing to poison
        yield
        return
    old = k1.POISON_OUTPUTS, k2.POISON_OUTPUTS
    k1.POISON_OUTPUTS = k2.POISON_OUTPUTS = True
    yield
    k1.POISON_OUTPUTS, k2.POISON_OUTPUTS = old


def tol_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise of the dtypes (the one whose TOL applies)."""
    return max(dtypes, key=lambda d: TOL[d])


# Where the terms of a formula cancel (|ref| << rss), assert_bounded takes rss / 2 for |ref|: rounding errors
# scale with rss, not with |ref|. Measured on CPU backends (7,000 checks, long profile): the worst error used 29%
# of the allowance with rss / 2 (49% with rss / 4), while rss itself would raise the norm test's allowance ~20%.
RSS_SHARE = 0.5


def assert_bounded(out: torch.Tensor, expected: torch.Tensor, rss: torch.Tensor, dtype: torch.dtype, name: str):
    """conftest.assert_close_to_ref (elementwise |out - ref| <= tol (|ref| + max|ref|), relative norm error
    <= tol), with |ref| raised to RSS_SHARE * rss where it is smaller. rss is the root-sum-square of the
    formula's terms (`_sq`), the size of the rounding errors, which add with random signs: a chance
    cancellation in a tiny output (|ref| << rss) is not a failure. Elsewhere |ref| is about rss and the test is
    conftest's, so a LoRA scaling 5% off fails in bf16 (tol 3e-2) and 1% off in fp16 (4e-3) wherever the LoRA
    term dominates an output (dA and dB always). An all-zero rss (M = 0, or no adapter) demands exact zeros."""
    assert out.shape == expected.shape, f"{name}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    out64, expected, rss = (t.detach().to(F64).cpu() for t in (out, expected, rss))
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten or NaN)"
    if expected.numel() == 0:
        return
    tol = TOL[dtype]
    err = (out64 - expected).abs()
    size = torch.maximum(expected.abs(), RSS_SHARE * rss)
    scale = size.max().item()
    bad = err > tol * (size + scale)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off, max err {err.max().item():.3e} "
                           f"at scale {scale:.3e} (tol {tol})")
    rel = err.norm().item() / max(size.norm().item(), 1e-300)
    assert err.norm().item() <= tol * size.norm().item(), f"{name}: relative error {rel:.3e} > {tol}"


def _sq(t):
    """t squared in float64 (each tensor of a list; None stays None). A formula that is a sum of products, each
    input at most once in a product (every output here), evaluated on squared inputs gives the sum of its squared
    terms: the square root of that is the rss assert_bounded takes. Scalings are squared by the caller."""
    if isinstance(t, (list, tuple)):
        return [_sq(u) for u in t]
    return None if t is None else t.detach().double().square()


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of t in another memory layout of its last two dims; NaN fills what lies between the elements,
    so a kernel that reads outside the tensor poisons its output."""
    if layout == "contiguous" or t.dim() < 2:
        return t.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":  # column-major
        return t.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)
    if layout == "colslice":  # row stride > columns
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 5), NAN, dtype=t.dtype)
        view = buf[..., 2:2 + t.shape[-1]]
    elif layout == "rowstep":  # every other row of a taller buffer
        buf = torch.full((*t.shape[:-2], 2 * t.shape[-2], t.shape[-1]), NAN, dtype=t.dtype)
        view = buf[..., ::2, :]
    else:
        raise ValueError(layout)
    view.copy_(t)
    return view


def strided_vector(v: torch.Tensor) -> torch.Tensor:
    buf = torch.full((2 * v.shape[0],), NAN, dtype=v.dtype)
    buf[::2] = v
    return buf[::2]


def dims(max_value: int, edge=(1,)):
    """Sizes biased towards the edges (1, and not multiples of any block) and the maximum."""
    return st.one_of(st.sampled_from(edge), st.integers(1, max_value))


# =====================================================================================================
# lora_linear: forward and every gradient
# =====================================================================================================

@st.composite
def lora_linear_cases(draw, backend: str):
    slow = backend not in FAST
    if backend == "torch":
        dtype = draw(st.sampled_from(ALL_DTYPES))
        lora_dtype = draw(st.sampled_from([dtype] + ALL_DTYPES))
    else:
        dtype = draw(st.sampled_from(LOW_DTYPES))
        lora_dtype = draw(st.sampled_from([dtype, torch.float32]))
    lead = draw(st.sampled_from([(), (), (2,), (1, 3)]))
    rows = 40 if slow else 96
    return dict(
        M=draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, rows // max(1, math.prod(lead))))),
        K=draw(dims(72 if slow else 160)), N=draw(dims(72 if slow else 160)),
        R=draw(st.one_of(st.sampled_from([1, 16, 64, 65, 130]), st.integers(1, 130))),
        lead=lead, dtype=dtype, lora_dtype=lora_dtype,
        x_layout=draw(st.sampled_from(["contiguous", "colslice", "transposed", "rowstep", "stride0"])),
        dy_layout=draw(st.sampled_from(["contiguous", "transposed", "stride0"])),
        bias=draw(st.sampled_from(["none", "contiguous", "strided"])),
        dropout_p=draw(st.one_of(st.sampled_from([0.0, 0.0, 0.5]), st.floats(0.0, 0.9))),
        need=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        # 0, or |scaling| in [1e-3, 4]: a scaling far below fp32's range rounds to 0 in any fp32 kernel.
        scaling=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.builds(lambda s, m: s * m, st.sampled_from([-1, 1]),
                                                                       st.floats(1e-3, 4.0)))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def lora_linear_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    lead, M, K, N, R = c["lead"], c["M"], c["K"], c["N"], c["R"]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    if c["x_layout"] == "stride0":  # every row the same element in memory
        x = rnd(K).to(c["dtype"]).expand(*lead, M, K)
    else:
        x = with_layout(rnd(*lead, M, K).to(c["dtype"]), c["x_layout"])
    W = (rnd(N, K) / math.sqrt(K)).to(c["dtype"])
    b = None if c["bias"] == "none" else rnd(N).to(c["dtype"])
    if c["bias"] == "strided":
        b = strided_vector(b)
    A = (rnd(R, K) / math.sqrt(K)).to(c["lora_dtype"])
    B = (rnd(N, R) / math.sqrt(R)).to(c["lora_dtype"])  # non-zero: the LoRA path shows in every output
    if c["dy_layout"] == "stride0":
        dy = rnd(N).to(c["dtype"]).expand(*lead, M, N)
    else:
        dy = with_layout(rnd(*lead, M, N).to(c["dtype"]), c["dy_layout"])
    return x, W, b, A, B, dy


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=hypothesis_examples(40))
@given(data=st.data())
def test_lora_linear_matches_reference(backend, data):
    c = data.draw(lora_linear_cases(backend), label="case")
    torch.manual_seed(c["seed"])  # the dropout seed comes from torch's generator: replays reproduce it
    x, W, b, A, B, dy = lora_linear_inputs(c)
    y, dx, dA, dB, seed = run_op(backend, x, W, b, A, B, dy, c["scaling"], c["dropout_p"], c["need"])
    expected = reference_outputs(x, W, b, A, B, dy, c["scaling"], c["dropout_p"], seed)
    # Squared terms: the keep scale 1 / (1 - p) enters each LoRA term once, so it goes into the scaling once more.
    rss = [t.sqrt() for t in reference_outputs(*map(_sq, (x, W, b, A, B, dy)), c["scaling"] ** 2 / (1 - c["dropout_p"]),
                                               c["dropout_p"], seed)]
    tol = tol_dtype(c["dtype"], c["lora_dtype"])
    M, N = math.prod(x.shape[:-1]), W.shape[0]
    assert y.dtype == c["dtype"] and y.shape == (*c["lead"], c["M"], N)
    assert_bounded(y.reshape(M, N), expected[0], rss[0], tol, "y")
    for name, got, want, size, needed, t in zip(("dx", "dA", "dB"), (dx, dA, dB), expected[1:], rss[1:],
                                                 c["need"], (x, A, B)):
        if not needed:
            assert got is None, f"{name} computed although not required"
            continue
        assert got.dtype == t.dtype and got.shape == t.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
        assert_bounded(got.reshape(want.shape), want, size, tol, name)


@pytest.mark.parametrize("dtype,off", [(torch.bfloat16, 1.05), (torch.float16, 1.01)], ids=["bf16-5%", "fp16-1%"])
def test_assert_bounded_fails_a_wrong_scaling(dtype, off):
    """The property tests can fail: with inputs drawn as above, the op's y, dx, dA and dB pass assert_bounded,
    and with the LoRA scaling `off` (5% in bf16, 1% in fp16) y (scaling 2: the LoRA term is most of it), dA and
    dB fail."""
    c = dict(M=24, K=40, N=32, R=8, lead=(), dtype=dtype, lora_dtype=dtype, x_layout="contiguous",
             dy_layout="contiguous", bias="contiguous", dropout_p=0.0, need=(True, True, True), scaling=2.0, seed=5)
    x, W, b, A, B, dy = lora_linear_inputs(c)
    expected = reference_outputs(x, W, b, A, B, dy, c["scaling"], 0.0, None)
    rss = [t.sqrt() for t in reference_outputs(*map(_sq, (x, W, b, A, B, dy)), c["scaling"] ** 2, 0.0, None)]
    names = ("y", "dx", "dA", "dB")
    for name, got, want, size in zip(names, run_op("torch", x, W, b, A, B, dy, c["scaling"], 0.0), expected, rss):
        assert_bounded(got, want, size, dtype, name)
    wrong = run_op("torch", x, W, b, A, B, dy, c["scaling"] * off, 0.0)
    for name, got, want, size in zip(names, wrong, expected, rss):
        if name != "dx":  # dx = G W0 + ...: how much of it the LoRA term is depends on the draw
            with pytest.raises(AssertionError, match=f"^{name}: (relative error|[0-9]+ of [0-9]+ elements off)"):
                assert_bounded(got, want, size, dtype, name)


# =====================================================================================================
# LoRABatch.from_token_adapters vs. a plain-Python model of the grouping
# =====================================================================================================

DISTRIBUTIONS = ["distinct", "uniform", "zipf", "identical", "none", "hot"]


def token_slots(dist: str, T: int, L: int, g: torch.Generator) -> list[int]:
    """T slot ids in [-1, L) drawn from an adapter-popularity distribution (Punica's cases)."""
    if dist == "distinct":  # every token its own slot (needs L >= T), scattered
        return torch.randperm(L, generator=g)[:T].tolist()
    if dist == "uniform":  # with -1 tokens
        return torch.randint(-1, L, (T,), generator=g).tolist()
    if dist == "zipf":  # popularity ~ 1 / rank^1.1 over a random order of slots, 10% base-model tokens
        w = torch.tensor([1.0 / (i + 1) ** 1.1 for i in range(L)] + [0.1 * sum(1.0 / (i + 1) ** 1.1
                                                                                 for i in range(L))])
        perm = torch.randperm(L, generator=g).tolist() + [-1]
        return [perm[i] for i in torch.multinomial(w, T, replacement=True, generator=g).tolist()] if T else []
    if dist == "identical":
        return [int(torch.randint(0, L, (1,), generator=g))] * T
    if dist == "none":
        return [-1] * T
    if dist == "hot":  # one hot slot, a few others
        hot = int(torch.randint(0, L, (1,), generator=g))
        other = torch.randint(-1, L, (T,), generator=g).tolist()
        return [o if u < 0.1 else hot for o, u in zip(other, torch.rand(T, generator=g).tolist())]
    raise ValueError(dist)


def grouping_model(ids: list[int], L: int) -> dict:
    """What LoRABatch must hold, computed the obvious way."""
    T = len(ids)
    key = [l if l >= 0 else L for l in ids]
    order = sorted(range(T), key=lambda t: key[t])  # Python's sort is stable
    lens = [key.count(l) for l in range(L)]
    starts = [sum(lens[:l]) for l in range(L)]
    active = [l for l in range(L) if lens[l]]
    bm = tile_block_m(T)
    tiles = [(l, s, min(s + bm, starts[l] + lens[l])) for l in active
             for s in range(starts[l], starts[l] + lens[l], bm)]
    nt = num_tiles(T, L)
    assert len(tiles) <= nt, "num_tiles must bound the tiles of every assignment"
    tiles += [(-1, 0, 0)] * (nt - len(tiles))
    return dict(token_adapter=ids, sorted_token_ids=order, seg_starts=starts, seg_lens=lens,
                active_slots=active + [-1] * (L - len(active)), num_active=[len(active)],
                tile_slot=[t[0] for t in tiles], tile_start=[t[1] for t in tiles], tile_end=[t[2] for t in tiles])


@settings(max_examples=hypothesis_examples(150))
@given(T=st.one_of(st.sampled_from([0, 1, 128, 129]), st.integers(0, 300)),
       L=st.one_of(st.sampled_from([1, 2]), st.integers(1, 300)), dist=st.sampled_from(DISTRIBUTIONS),
       form=st.sampled_from(["list", "int64", "int32", "strided"]), seed=st.integers(0, 2**31 - 1))
def test_lora_batch_matches_model(T, L, dist, form, seed):
    if dist == "distinct":
        L = max(L, T)
    ids = token_slots(dist, T, L, torch.Generator().manual_seed(seed))
    arg = {"list": lambda: ids, "int64": lambda: torch.tensor(ids, dtype=torch.int64),
           "int32": lambda: torch.tensor(ids, dtype=torch.int32),
           "strided": lambda: torch.tensor([v for i in ids for v in (i, 999)], dtype=torch.int64)[::2]}[form]()
    batch = LoRABatch.from_token_adapters(arg, L)
    model = grouping_model(ids, L)
    assert batch.num_tokens == T and batch.num_slots == L and batch.block_m == tile_block_m(T)
    for name, want in model.items():
        t = getattr(batch, name)
        assert t.dtype == torch.int32 and t.dim() == 1, name
        assert t.tolist() == want, f"{name}: {t.tolist()} != {want}"
    # Per-sequence construction is the same as spelling out every token.
    if T:
        seq_len = 1 + seed % 3
        seq = LoRABatch.from_sequences(ids, seq_len, L)
        whole = LoRABatch.from_token_adapters([i for i in ids for _ in range(seq_len)], L)
        for name in model:
            assert torch.equal(getattr(seq, name), getattr(whole, name)), name


# =====================================================================================================
# lora_shrink / lora_expand / multi_lora_linear vs. the per-token float64 loops
# =====================================================================================================

@st.composite
def multi_cases(draw, backend: str):
    slow = backend not in FAST
    dtype = draw(st.sampled_from(ALL_DTYPES if backend == "torch" else LOW_DTYPES))
    # "torch" takes adapters (and for expand, y) of any float dtype; the kernels need x's dtype.
    lora_dtype = draw(st.sampled_from([dtype] + ALL_DTYPES)) if backend == "torch" else dtype
    R = draw(st.one_of(st.sampled_from([1, 16, 64, 65]), st.integers(1, 80 if slow else 130)))
    L = draw(st.integers(1, 6))
    dist = draw(st.sampled_from(DISTRIBUTIONS))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40 if slow else 150)))
    if dist == "distinct":
        L = max(L, T)
    # ranks: None (R for every slot) or per slot, with 0s, and values outside [0, R] (clamped).
    ranks = draw(st.one_of(st.none(), st.lists(st.one_of(st.sampled_from([0, 1, R]), st.integers(-2, R + 3)),
                                               min_size=L, max_size=L)))
    return dict(
        T=T, L=L, R=R, dist=dist, ranks=ranks, dtype=dtype, lora_dtype=lora_dtype,
        K=draw(dims(64 if slow else 160)), widths=draw(st.lists(dims(40 if slow else 96), min_size=1, max_size=5)),
        lead=draw(st.sampled_from([(), (1,)])),
        x_layout=draw(st.sampled_from(["contiguous", "colslice", "transposed", "rowstep", "stride0"])),
        y_layout=draw(st.sampled_from(["contiguous", "colslice", "transposed", "rowstep"])),
        y_offset=draw(st.sampled_from([0, 0, 1, 5])), y_extra=draw(st.sampled_from([0, 3])),
        stacks_as=draw(st.sampled_from(["list", "tensor"])),  # one slice may be passed as a bare tensor
        bias=draw(st.sampled_from(["none", "contiguous", "strided"])),
        scalings=draw(st.sampled_from(["tensor", "float"])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def multi_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    T, K, L, R, widths, dt, ldt = c["T"], c["K"], c["L"], c["R"], c["widths"], c["dtype"], c["lora_dtype"]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    if c["x_layout"] == "stride0":
        x = rnd(K).to(dt).expand(T, K)
    else:
        x = with_layout(rnd(T, K).to(dt), c["x_layout"])
    # Padding beyond each slot's rank is random on purpose: the ops must never read it into a result.
    A = [(rnd(L, R, K) / math.sqrt(K)).to(ldt) for _ in widths]
    B = [(rnd(L, n, R) / math.sqrt(R)).to(ldt) for n in widths]
    W = (rnd(sum(widths), K) / math.sqrt(K)).to(dt)
    bias = None if c["bias"] == "none" else rnd(sum(widths)).to(dt)
    if c["bias"] == "strided":
        bias = strided_vector(bias)
    sc = (torch.rand(L, generator=g, dtype=F64) * 4 - 2).float()
    scalings = sc if c["scalings"] == "tensor" else float(sc[0])
    sc_list = sc if c["scalings"] == "tensor" else torch.full((L,), float(sc[0]))
    ranks = None if c["ranks"] is None else torch.tensor(c["ranks"], dtype=torch.int32)
    ta = token_slots(c["dist"], T, L, g)
    return x, A, B, W, bias, scalings, sc_list, ranks, ta


def _stacks(stacks, c):
    return stacks[0] if (c["stacks_as"] == "tensor" and len(stacks) == 1) else stacks


def _rank_mask(c, ta, NS):
    """[T, NS·R] True where S may be non-zero (the token has a slot and the column is below its rank)."""
    T, R, L = c["T"], c["R"], c["L"]
    rk = [R] * L if c["ranks"] is None else [min(max(r, 0), R) for r in c["ranks"]]
    mask = torch.zeros(T, NS * R, dtype=torch.bool)
    for t, l in enumerate(ta):
        if l >= 0:
            for i in range(NS):
                mask[t, i * R:i * R + rk[l]] = True
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=hypothesis_examples(30))
@given(data=st.data())
def test_lora_shrink_matches_loop(backend, data):
    c = data.draw(multi_cases(backend), label="case")
    x, A, _, _, _, _, _, ranks, ta = multi_inputs(c)
    batch = LoRABatch.from_token_adapters(ta, c["L"])
    S = lk.lora_shrink(x, _stacks(A, c), batch, ranks, backend=backend)
    f64 = F64 in (c["dtype"], c["lora_dtype"])
    assert S.dtype == (F64 if f64 else torch.float32) and S.shape == (c["T"], len(A) * c["R"])
    expected = ref.multi_lora_shrink(x.double(), [a.double() for a in A], ta, ranks)
    rss = ref.multi_lora_shrink(_sq(x), _sq(A), ta, ranks).sqrt()
    assert_bounded(S, expected, rss, tol_dtype(c["dtype"], c["lora_dtype"]), "S")
    zero = ~_rank_mask(c, ta, len(A))
    assert (S[zero] == 0).all(), "S must be exactly 0 for -1 tokens and columns at or past a slot's rank"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=hypothesis_examples(30))
@given(data=st.data())
def test_lora_expand_matches_loop(backend, data):
    c = data.draw(multi_cases(backend), label="case")
    _, _, B, _, _, scalings, sc, ranks, ta = multi_inputs(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    T, NS, R = c["T"], len(B), c["R"]
    # Garbage everywhere in S (-1 rows, columns past ranks): the expand must read only what the formula says.
    S_vals = torch.randn(T, NS * R, generator=g)
    S = with_layout(S_vals, "colslice")
    N = sum(c["widths"])
    ydt = c["lora_dtype"] if backend == "torch" else c["dtype"]
    y0 = torch.randn(T, c["y_offset"] + N + c["y_extra"], generator=g, dtype=F64).to(ydt)
    y = with_layout(y0, c["y_layout"])
    out = lk.lora_expand(S, _stacks(B, c), LoRABatch.from_token_adapters(ta, c["L"]), y, scalings, ranks,
                         y_offset=c["y_offset"], backend=backend)
    assert out is y
    lo, hi = c["y_offset"], c["y_offset"] + N
    delta = ref.multi_lora_expand_delta(S_vals.double(), [b.double() for b in B], sc, ta, ranks)
    delta_ss = ref.multi_lora_expand_delta(_sq(S_vals), _sq(B), _sq(sc), ta, ranks)
    expected = y0.double().clone()
    expected[:, lo:hi] += delta
    ss = _sq(y0)
    ss[:, lo:hi] += delta_ss
    assert_bounded(y, expected, ss.sqrt(), tol_dtype(c["dtype"], ydt), "y")
    untouched = torch.ones_like(y0, dtype=torch.bool)
    untouched[[t for t, l in enumerate(ta) if l >= 0], lo:hi] = False
    assert torch.equal(y[untouched], y0[untouched]), "-1 tokens and columns outside the slices must not change"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=hypothesis_examples(30))
@given(data=st.data())
def test_multi_lora_linear_matches_loop(backend, data):
    c = data.draw(multi_cases(backend), label="case")
    x, A, B, W, bias, scalings, sc, ranks, ta = multi_inputs(c)
    batch = LoRABatch.from_token_adapters(ta, c["L"])
    xin = x.reshape(*c["lead"], *x.shape)
    y = lk.multi_lora_linear(xin, W, bias, _stacks(A, c), _stacks(B, c), scalings, batch, ranks, backend=backend)
    N = sum(c["widths"])
    assert y.dtype == c["dtype"] and y.shape == (*c["lead"], c["T"], N)
    f64 = lambda ts: [t.double() for t in ts]
    b64 = None if bias is None else bias.double()
    expected = ref.multi_lora_linear_forward(x.double(), W.double(), b64, f64(A), f64(B), sc, ta, ranks)
    rss = ref.multi_lora_linear_forward(*map(_sq, (x, W, bias, A, B, sc)), ta, ranks).sqrt()
    assert_bounded(y.reshape(c["T"], N), expected, rss, tol_dtype(c["dtype"], c["lora_dtype"]), "y")
