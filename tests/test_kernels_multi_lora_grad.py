"""The Triton training kernels of the multi-adapter op (lora_kernels/kernels/multi_lora.py): the forward's shrink
with the dropout mask regenerated in-kernel, and the grouped backward (dS/dB in one pass over G, dA per segment,
dx = G W0 + the expand in DX mode) of the "triton" and "composite" backends, against the per-token float64 loops of
lora_kernels.reference, with every kernel output poisoned with NaN first.

Covers heterogeneous ranks 1-24 and 0, -1 tokens, slots without tokens, 1-3 and 5 slices (more than MAX_SLICES:
two launches), per-slot dropout, the serving distributions, walks that flush across slots and split n-walks,
deterministic mode (no atomics, bitwise repeats) and the launch plans at Llama shapes. Triton runs under the
interpreter on CPU (TRITON_INTERPRET=1): shapes are small on purpose. Problems and the reference check come from
tests/test_multi_lora_grad.py.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import lora_kernels as lk
from lora_kernels.dropout import keep_threshold, new_seed
from lora_kernels.ops import multi_lora as ops
from lora_kernels.ops import multi_lora_torch
from lora_kernels.ops.multi_lora import LoRABatch

from conftest import assert_close_to_ref
from test_multi_lora import _poison  # noqa: F401 (autouse: kernel outputs start as NaN)
from test_multi_lora_grad import _check, _problem, _reference

triton = pytest.importorskip("triton", reason="the multi-adapter Triton kernels")

from lora_kernels.kernels import aot_cases, multi_lora as k  # noqa: E402
from test_kernels_multi_lora import _AtomicSpy  # noqa: E402

INTERPRETED = "triton" in lk.available_backends("cpu")
runs_kernels = pytest.mark.skipif(not INTERPRETED, reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 set "
                                                          "before lora_kernels is imported")
BACKENDS = [pytest.param(b, id=b, marks=runs_kernels) for b in ("triton", "composite")]

# Beyond tests/test_multi_lora_grad.py's CASES (which run these backends too): five slices (a second launch past
# MAX_SLICES = 4), prefill-sized batches (T > 128: 64-row tiles, segments of several tiles), every slot at the
# padded rank (ranks=None), and the four distributions at one shape.
CASES = {
    "5slices-uniform-dropout": dict(T=29, L=6, widths=(8, 16, 8, 24, 12), ranks=(3, 24, 0, 1, 17, 6),
                                    dist="uniform", dropout=(0.2, 0.0, 0.4, 0.1, 0.3, 0.0)),
    "prefill-zipf-dropout": dict(T=300, L=5, widths=(20, 12), ranks=(24, 0, 1, 9, 5), dist="zipf", dropout=0.3),
    "prefill-identical-3slices": dict(T=150, L=3, widths=(8, 12, 8), ranks=(2, 13, 4), dist="identical"),
    "ranks-none-uniform-dropout": dict(T=33, L=5, widths=(16,), ranks=None, dist="uniform", dropout=0.25),
    **{f"{d}-2slices": dict(T=24, L=26 if d == "distinct" else 6, widths=(12, 8), dist=d, dropout=0.15,
                            ranks=tuple((7 * i) % 25 for i in range(26 if d == "distinct" else 6)))
       for d in ("distinct", "uniform", "zipf", "identical")},
}


def _grad_problem(case, **kw):
    c = {**CASES[case], **kw}
    p = _problem(**{**c, "ranks": c["ranks"] or (0,) * c["L"]})
    return {**p, "ranks": None} if c["ranks"] is None else p


@contextlib.contextmanager
def _deterministic(flag: bool = True):
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ------------------------------------------------------------------------------------------- vs. reference

# The two backends share the backward and differ in the forward's base GEMM: the distribution cases run "triton" only.
@pytest.mark.parametrize("backend,case", [pytest.param(b.values[0], c, id=f"{b.id}-{c}", marks=b.marks)
                                          for c in CASES for b in BACKENDS
                                          if b.id == "triton" or not c.endswith("-2slices")])
def test_grads_match_reference(backend, case):
    p = _grad_problem(case)
    if p["ranks"] is None:
        _check_none_ranks(backend, p)
    else:
        _check(backend, p)


def _check_none_ranks(backend, p):
    """_check's comparisons, for ranks=None (which _check's padding test cannot take)."""
    x = p["x"].clone().requires_grad_()
    A = [a.clone().requires_grad_() for a in p["A"]]
    B = [b.clone().requires_grad_() for b in p["B"]]
    torch.manual_seed(4)
    y = ops.multi_lora_linear(x, p["W"], p["bias"], A, B, p["scalings"], LoRABatch.from_token_adapters(p["ta"], p["L"]),
                              None, backend=backend, dropout_p=p["dropout"], training=True)
    torch.manual_seed(4)
    seed = new_seed()  # the one the op drew
    full = torch.full((p["L"],), p["A"][0].shape[1], dtype=torch.int32)  # ranks=None: every slot at R
    y_ref, dx_ref, dA_ref, dB_ref = _reference({**p, "ranks": full}, seed)
    y.backward(p["dy"])
    assert_close_to_ref(y, y_ref, torch.float32, "y")
    assert_close_to_ref(x.grad, dx_ref, torch.float32, "dx")
    for i in range(len(A)):
        assert_close_to_ref(A[i].grad, dA_ref[i], torch.float32, f"dA[{i}]")
        assert_close_to_ref(B[i].grad, dB_ref[i], torch.float32, f"dB[{i}]")


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_prefill(dtype):
    _check("triton", _grad_problem("prefill-zipf-dropout", T=200, dtype=dtype))


@runs_kernels
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["x", "A", "B"])
def test_partial_grads_five_slices(need):
    """One gradient at a time, past MAX_SLICES: a B-only backward still runs the dS pass (its dS unread)."""
    _check("composite", _grad_problem("5slices-uniform-dropout", seed=2), need)


@runs_kernels
@pytest.mark.parametrize("tiles,split,case", [(3, 1, "distinct-2slices"), (1, 3, "prefill-zipf-dropout"),
                                              (5, 2, "prefill-zipf-dropout")], ids=["walk3", "split3", "walk5-split2"])
def test_walks_and_splits(monkeypatch, tiles, split, case):
    """dA programs that walk several segment tiles (flushing their block at each slot change, and across program
    boundaries), and dS/dB programs that split the n-walk (dS partials added atomically). The default configs do
    neither at these sizes; forced here with counts that are not powers of two. Prefill: segments of several
    64-row tiles, slices of 3 and 2 n-blocks (fp32 BLOCK_N = 16 at rank 24)."""
    monkeypatch.setattr(k, "da_tiles_per_program", lambda *a: tiles)
    monkeypatch.setattr(k, "ds_db_split_n", lambda *a: split)
    kw = dict(T=200, widths=(40, 24)) if case.startswith("prefill") else {}
    _check("triton", _grad_problem(case, **kw))


# ------------------------------------------------------------------------------------------- dropout in-kernel

def test_slot_dropout_thresholds_are_keep_threshold():
    """The per-slot thresholds the kernels compare with are lk.dropout's, bit for bit (ties round to even)."""
    ps = [0.0, 0.1, 0.25, 0.3, 0.5, 0.999, 1 - 2 ** -40, 0.5 / 2 ** 31, 1.5 / 2 ** 31, 2.5 / 2 ** 31]
    seed = new_seed()
    d = k.slot_dropout(torch.tensor(ps, dtype=torch.float64), seed)
    assert d.seed == int(seed) and d.thr.dtype == torch.int32 and d.keep.dtype == torch.float32
    assert d.thr.tolist() == [keep_threshold(p) for p in ps]
    assert torch.equal(d.keep, torch.tensor([1.0 / (1.0 - p) for p in ps], dtype=torch.float32))
    assert k.slot_dropout(torch.tensor(ps, dtype=torch.float64), None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_never_builds_x_hat(monkeypatch, backend):
    """The Triton forwards apply the mask inside the shrink: the x̂ the native forward builds is never made."""
    def fail(*a, **kw):
        raise AssertionError("x̂ was materialised")

    monkeypatch.setattr(ops, "dropped_input", fail)
    _check(backend, _grad_problem("uniform-2slices"))


# ------------------------------------------------------------------------------------------- what runs

@runs_kernels
def test_registered_as_own_backward_and_launches(monkeypatch):
    """"triton" and "composite" run their own backward: the grouped kernels (never the torch per-segment loops), dx's
    term through the expand kernel in DX mode; the training forward of "triton" is the fused GEMM (it returns S),
    that of "composite" cuBLAS + expand."""
    assert all(ops.IMPLS[b][1] is not ops.torch_bwd for b in ("triton", "composite"))

    def no_segments(*a):
        raise AssertionError("the torch implementation ran")

    monkeypatch.setattr(multi_lora_torch, "_segments", no_segments)
    names = []
    orig = k.Launch.run
    monkeypatch.setattr(k.Launch, "run", lambda l: names.append((l.kernel_name(), dict(l.constexprs))) or orig(l))
    for backend, fwd_kernels in (("triton", {"_multi_lora_shrink_kernel", "_multi_lora_gemm_kernel"}),
                                 ("composite", {"_multi_lora_shrink_kernel", "_multi_lora_expand_kernel"})):
        p = _grad_problem("uniform-2slices")
        del names[:]
        x = p["x"].clone().requires_grad_()
        A = [a.clone().requires_grad_() for a in p["A"]]
        B = [b.clone().requires_grad_() for b in p["B"]]
        y = ops.multi_lora_linear(x, p["W"], p["bias"], A, B, p["scalings"],
                                  LoRABatch.from_token_adapters(p["ta"], p["L"]), p["ranks"], backend=backend,
                                  dropout_p=p["dropout"], training=True)
        assert {n for n, _ in names} == fwd_kernels, names
        assert all(c["HAS_DROPOUT"] for n, c in names if n == "_multi_lora_shrink_kernel")
        del names[:]
        y.backward(p["dy"])
        assert {n for n, _ in names} == {"_multi_lora_bwd_ds_db_kernel", "_multi_lora_bwd_da_kernel",
                                         "_multi_lora_expand_kernel"}, names
        assert all(c["DX"] and c["HAS_DROPOUT"] for n, c in names if n == "_multi_lora_expand_kernel")
        assert x.grad is not None and all(t.grad is not None for t in A + B)


# ------------------------------------------------------------------------------------------- determinism

def _op_args(p):
    """x and dy as [T, *], the LoRABatch tensors, the per-slot dropout as the ops pass it ([L] float64)."""
    x, dy = p["x"].reshape(-1, p["x"].shape[-1]), p["dy"].reshape(-1, p["dy"].shape[-1])
    bt = LoRABatch.from_token_adapters(p["ta"], p["L"]).op_args()
    dropout = ops.dropout_args(p["dropout"], p["L"], x.device, True)[0]
    return x, dy, bt, dropout


def _fwd_bwd_kernels(p, seed):
    x, dy, bt, dropout = _op_args(p)
    y, S = k.multi_lora_linear_fwd_triton(x, p["W"], p["bias"], p["A"], p["B"], p["scalings"], bt, p["ranks"],
                                          dropout, seed)
    dx, dA, dB = k.multi_lora_linear_bwd_triton(dy, x, p["W"], p["A"], p["B"], S, p["scalings"], bt, p["ranks"],
                                                dropout, seed, True, True, True)
    return [y, S, dx, *dA, *dB]


@runs_kernels
@pytest.mark.parametrize("case", ["prefill-zipf-dropout", "distinct-2slices"])
def test_deterministic_mode_no_atomics_bitwise_repeats(monkeypatch, case):
    """Under torch.use_deterministic_algorithms(True) the training forward and backward execute no atomic at all
    (dB as per-tile partials summed in tile order, dA by one walk per column block, dS never split) and repeat
    bit for bit; by default they add with relaxed atomics only. Both match the reference."""
    from triton._C.libtriton import ir
    p = _grad_problem(case, T=200 if case.startswith("prefill") else 10)
    seed = new_seed()
    _, dx_ref, dA_ref, dB_ref = _reference(p, seed)
    refs = [dx_ref, *dA_ref, *dB_ref]
    with _deterministic():
        spy = _AtomicSpy(monkeypatch)
        first, again = _fwd_bwd_kernels(p, seed), _fwd_bwd_kernels(p, seed)
        assert spy.ops == [], f"deterministic mode added atomically: {spy.ops[:3]}"
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"output {i} differs between two deterministic runs"
    spy = _AtomicSpy(monkeypatch)
    default = _fwd_bwd_kernels(p, seed)
    assert spy.ops and {sem for _, sem, _ in spy.ops} == {str(ir.MEM_SEMANTIC.RELAXED)}, spy.ops[:3]
    for outs in (first, default):
        for i, (got, want) in enumerate(zip(outs[2:], refs)):
            assert_close_to_ref(got, want, torch.float32, f"gradient {i}")


@runs_kernels
def test_empty_batch_and_all_minus_one_tokens():
    """T = 0 and a batch whose tokens all have no adapter: zero dA / dB everywhere (written, not left as the poison),
    dx = G W0."""
    for T, ta in ((0, torch.zeros(0, dtype=torch.int64)), (9, torch.full((9,), -1))):
        p = {**_grad_problem("uniform-2slices", T=T), "ta": ta}
        x, dy, bt, dropout = _op_args(p)
        S = torch.zeros(T, 2 * 24)
        for det in (False, True):
            with _deterministic(det):
                dx, dA, dB = k.multi_lora_linear_bwd_triton(dy, x, p["W"], p["A"], p["B"], S, p["scalings"], bt,
                                                            p["ranks"], dropout, new_seed(), True, True, True)
            torch.testing.assert_close(dx, dy @ p["W"])
            assert all(torch.equal(g, torch.zeros_like(g)) for g in dA + dB)


# ------------------------------------------------------------------------------------------- plans at Llama shapes

@pytest.mark.parametrize("K,widths", [(4096, (4096,)), (4096, (4096, 1024, 1024)), (14336, (4096,))],
                         ids=["q_4096", "qkv_4096", "down_14336"])
@pytest.mark.parametrize("T", [1, 64, 256, 1000, 4096])
def test_bwd_grids_fill_the_gpu(K, widths, T):
    """bf16, rank 16, 64 slots, every token on one slot (the fewest tiles): the dS/dB pass and the dA walk still give
    at least ~one CTA per SM of an H100 where the problem has that much work, and the grids stay bounded (programs
    of unused tiles exit at once). Deterministic plans split nothing and walk every tile in one program per block."""
    x, W, bias, A, B, S, y, bt, sc, ranks = aot_cases.multi_lora_meta(T, K, widths, 16, 64, torch.bfloat16, True, False)
    launches = k.plan_bwd(y, x, A, B, S, x, bt, sc, ranks)[0]
    ds_db = [l for l in launches if l.kernel is k._multi_lora_bwd_ds_db_kernel]
    (da,) = [l for l in launches if l.kernel is k._multi_lora_bwd_da_kernel]
    assert len(ds_db) == 1 and ds_db[0].constexprs["ATOMIC"] and da.constexprs["ATOMIC"]
    fewest = triton.cdiv(T, k.tile_block_m(T))
    active_ds_db = fewest * ds_db[0].grid[1]
    active_da = triton.cdiv(fewest, da.args["tiles_per_prog"]) * da.grid[1] * da.grid[2]
    n_blocks = triton.cdiv(max(widths), ds_db[0].constexprs["BLOCK_N"]) * len(widths)
    assert active_ds_db >= min(125, fewest * n_blocks), (T, ds_db[0].grid)
    assert active_da >= min(125, fewest * da.grid[1] * da.grid[2]), (T, da.grid, da.args["tiles_per_prog"])
    assert ds_db[0].grid[0] * ds_db[0].grid[1] <= k._MAX_PROGRAMS
    det = k.plan_bwd(y, x, A, B, S, x, bt, sc, ranks, deterministic=True)[0]
    (det_ds_db,) = [l for l in det if l.kernel is k._multi_lora_bwd_ds_db_kernel]
    (det_da,) = [l for l in det if l.kernel is k._multi_lora_bwd_da_kernel]
    assert det_ds_db.args["split_n"] == 1 and not det_ds_db.constexprs["ATOMIC"]
    assert det_da.grid[0] == 1 and not det_da.constexprs["ATOMIC"]
    assert [l.kernel for l in det].count(k._multi_lora_tile_sum_kernel) == len(widths)


def test_report_and_aot_cover_the_backward():
    """The static report's backward cases (T = 64 / 4096, q and fused qkv, p = 0 / 0.1) run the dS/dB pass, the dA
    walk, dx's expand in DX mode (dropout as the case says) and the casts to bf16; every launch of them, and the
    deterministic and B-less variants, are in the ahead-of-time list."""
    cases = {}
    for case, launch in aot_cases.report_launches("multi_lora"):
        if "[bwd]" in case:
            cases.setdefault(case, []).append(launch)
    assert len(cases) == 2 * 2 * 2
    for case, launches in cases.items():
        kernels = [l.kernel for l in launches]
        assert kernels[:3] == [k._multi_lora_bwd_ds_db_kernel, k._multi_lora_bwd_da_kernel,
                               k._multi_lora_expand_kernel], case
        assert launches[2].constexprs["DX"] and launches[2].constexprs["HAS_DROPOUT"] == case.endswith("p=0.1")
        assert all(l.kernel_name() == "_sum_splits_kernel" for l in launches[3:]), case
    aot = list(aot_cases.aot_launches("multi_lora"))
    keys = {(l.describe(), tuple(sorted(l.signature().items()))) for l in aot}
    for launches in cases.values():
        assert all((l.describe(), tuple(sorted(l.signature().items()))) in keys for l in launches)
    ds_db = {(l.constexprs["COMPUTE_DB"], l.constexprs["ATOMIC"]) for l in aot if l.kernel is k._multi_lora_bwd_ds_db_kernel}
    da = {(l.constexprs["HAS_DROPOUT"], l.constexprs["ATOMIC"]) for l in aot if l.kernel is k._multi_lora_bwd_da_kernel}
    assert ds_db == da == {(a, b) for a in (False, True) for b in (False, True)}
    assert any(l.kernel is k._multi_lora_tile_sum_kernel for l in aot)
    assert {l.constexprs["HAS_DROPOUT"] for l in aot if l.kernel is k._multi_lora_shrink_kernel} == {False, True}
