"""The multi-adapter Triton launchers (lora_kernels/kernels/multi_lora.py) below the registered ops: the cuBLAS
composite, strided inputs, deterministic plans (no atomics), relaxed atomics otherwise, every launch through
Launch.run on the inputs' device, every shipped GEMM tile, and grids that fill the GPU.

Triton runs under the interpreter on CPU (TRITON_INTERPRET=1); the checks that need two GPUs, or a GPU's
unordered atomics, are marked `gpu`. Problems and tolerances come from tests/test_multi_lora.py.
"""
from __future__ import annotations

import ast
import inspect

import pytest
import torch

from lora_kernels import reference as ref
from lora_kernels.backends import available_backends
from lora_kernels.ops.multi_lora import LoRABatch, lora_expand, multi_lora_linear

from test_multi_lora import _close, _f64, _poison, _problem  # noqa: F401 (_poison: autouse NaN outputs)

triton = pytest.importorskip("triton", reason="the multi-adapter Triton kernels")

from lora_kernels.kernels import aot_cases, multi_lora as k  # noqa: E402
from lora_kernels.kernels._launch import Launch  # noqa: E402

DEV = "cpu" if "triton" in available_backends("cpu") else "cuda"
INTERPRETED = DEV == "cpu"
# Tests that run kernels: on CPU tensors under the interpreter, else on a GPU (plan-only tests always run).
runs_kernels = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                  reason="running Triton kernels needs TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="watches atomics in Triton's CPU interpreter")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
NAN = float("nan")


def _to(dev, *ts):
    return [None if t is None else [u.to(dev) for u in t] if isinstance(t, list) else t.to(dev) for t in ts]


def _expected(x, W, bias, A, B, sc, ta, rk):
    return ref.multi_lora_linear_forward(x.double(), W.double(), None if bias is None else bias.double(),
                                         _f64(A), _f64(B), sc, ta, rk)


def _in_nan(t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """A copy of 2-D `t` with non-unit strides inside a NaN buffer (transposed storage if asked): a kernel that
    reads outside the view's elements reads NaN."""
    rows, cols = (t.shape[1], t.shape[0]) if transpose else t.shape
    big = torch.full((rows + 1, 2 * cols + 3), NAN, dtype=t.dtype, device=t.device)
    view = big[:rows, 1:2 * cols + 1:2]
    view = view.T if transpose else view
    view.copy_(t)
    return view


def _strided_vec(t: torch.Tensor) -> torch.Tensor:
    big = torch.full((2 * t.shape[0],), 0, dtype=t.dtype, device=t.device)
    if t.is_floating_point():
        big.fill_(NAN)
    big[::2] = t
    return big[::2]


# ------------------------------------------------------------------------------------------- composite

@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,T,widths,has_bias", [
    ("random", 37, (24,), True), ("distinct", 6, (24, 8, 8), False), ("one", 70, (24,), False),
    ("sparse", 13, (16, 8), True), ("none", 9, (24,), True), ("random", 1, (24, 8, 8, 16), True),
    ("random", 0, (24,), True), ("sorted", 150, (24, 8, 8), True), ("random", 19, (8, 16, 8, 8, 24), False)])
def test_composite_matches_reference(dtype, case, T, widths, has_bias):
    """cuBLAS (F.linear) + grouped shrink + grouped expand in place == the per-token float64 loops; ranks
    include 0 (a slot without this layer) and the padded R; -1 tokens get the base output."""
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=T, case=case, widths=widths, ranks=(0, 12, 5, 0, 1, 9))
    bias = bias if has_bias else None
    batch = LoRABatch.from_token_adapters(ta, 6, device=DEV)
    xd, Wd, bd, scd, rkd, Ad, Bd = _to(DEV, x, W, bias, sc, rk, A, B)
    y = k.multi_lora_linear_composite(xd, Wd, bd, Ad, Bd, scd, batch.op_args(), rkd)
    assert y.shape == (T, sum(widths)) and y.dtype == dtype and y.device.type == DEV
    _close(y.cpu(), _expected(x, W, bias, A, B, sc, ta, rk), dtype, "y")


@runs_kernels
def test_composite_and_fused_agree_with_every_rank_full():
    """ranks=None (every slot uses the padded R = 70 > 64: several rank chunks), both paths."""
    x, A, B, W, bias, sc, _, ta = _problem(torch.float32, T=23, R=70, ranks=None, widths=(24, 8))
    bt = LoRABatch.from_token_adapters(ta, 6, device=DEV).op_args()
    expected = _expected(x, W, bias, A, B, sc, ta, None)
    args = _to(DEV, x, W, bias, A, B, sc)
    for fn in (k.multi_lora_linear_composite, k.multi_lora_linear_triton):
        _close(fn(*args, bt, None).cpu(), expected, torch.float32, fn.__name__)


# ------------------------------------------------------------------------------------------- strides

@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(dtype):
    """x (transposed storage), W0, bias, scalings and ranks as strided views inside NaN, through the fused and the
    composite paths: nothing assumes unit strides it was not given."""
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=29, widths=(24, 8), ranks=(0, 12, 5, 7, 1, 9))
    bt = LoRABatch.from_token_adapters(ta, 6, device=DEV).op_args()
    expected = _expected(x, W, bias, A, B, sc, ta, rk)
    xd, Wd, bd, scd, rkd, Ad, Bd = _to(DEV, x, W, bias, sc, rk, A, B)
    xs, Ws = _in_nan(xd, transpose=True), _in_nan(Wd)
    assert xs.stride(1) > xs.stride(0) > 1 and Ws.stride(1) == 2
    bs, scs, rks = _strided_vec(bd), _strided_vec(scd), _strided_vec(rkd)
    for fn in (k.multi_lora_linear_triton, k.multi_lora_linear_composite):
        _close(fn(xs, Ws, bs, Ad, Bd, scs, bt, rks).cpu(), expected, dtype, fn.__name__)
    # The public op with the same views (backend="triton": its checks accept any strides).
    if DEV == "cpu" or "triton" in available_backends(DEV):
        y = multi_lora_linear(xs, Ws, bs, Ad, Bd, scs, LoRABatch.from_token_adapters(ta, 6, device=DEV), rks,
                              backend="triton")
        _close(y.cpu(), expected, dtype, "multi_lora_linear")


@runs_kernels
@pytest.mark.parametrize("layout", ["transposed", "column_stride_2"])
def test_expand_strided_s_and_y(layout):
    """S with a non-unit column stride (transposed storage, or every other column inside NaN), into a strided y
    at y_offset: only y[:, 3:3 + N] of the adapted tokens changes."""
    T, widths = 21, (24, 8, 16)
    x, A, B, *_, sc, rk, ta = _problem(torch.float32, T=T, widths=widths, ranks=(0, 12, 5, 7, 1, 9))
    batch = LoRABatch.from_token_adapters(ta, 6, device=DEV)
    S_ref = ref.multi_lora_shrink(x.double(), _f64(A), ta, None).float()  # garbage past the ranks on purpose
    S = _in_nan(S_ref.to(DEV), transpose=layout == "transposed")
    assert S.stride(1) != 1
    N = sum(widths)
    y0 = torch.randn(T, N + 7)
    y = _in_nan(y0.to(DEV))
    Bd = [b.to(DEV) for b in B]
    lora_expand(S, Bd, batch, y, sc.to(DEV), rk.to(DEV), y_offset=3, backend="triton")
    expected = y0.double().clone()
    expected[:, 3:3 + N] += ref.multi_lora_expand_delta(S_ref.double(), _f64(B), sc, ta, rk)
    _close(y.cpu(), expected, torch.float32, "y")
    assert torch.equal(y.cpu()[ta < 0], y0[ta < 0]), "-1 tokens must be left untouched"


# ------------------------------------------------------------------------------------------- atomics

class _AtomicSpy:
    """Records every atomic read-modify-write the interpreter executes: (op, semantics, elements)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpreterBuilder
        self.ops = []
        orig = InterpreterBuilder.create_atomic_rmw

        def spy(builder, rmw_op, ptr, val, mask, sem, scope):
            self.ops.append((str(rmw_op), str(sem), int(mask.data.sum())))
            return orig(builder, rmw_op, ptr, val, mask, sem, scope)

        monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", spy)


def _decode_problem(dtype=torch.float32):
    # in=256 gives the fp32 shrink 8 K-blocks of 32, so a decode batch (5 tokens on distinct slots) splits K.
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=5, in_f=256, widths=(24, 8, 8), case="distinct",
                                            ranks=(3, 12, 5, 0, 1, 9))
    return x, A, B, W, bias, sc, rk, ta, LoRABatch.from_token_adapters(ta, 6).op_args()


@needs_interpreter
@pytest.mark.parametrize("plan", ["fused", "composite", "shrink"])
def test_deterministic_plans_add_nothing_atomically(monkeypatch, plan):
    """Run each plan's launches and watch the atomics the kernels execute: none in a deterministic plan (split 1,
    one store per element of S); in the default plan the split-K shrink adds, with relaxed semantics only."""
    from triton._C.libtriton import ir
    x, A, B, W, bias, sc, rk, ta, bt = _decode_problem()
    expected = _expected(x, W, bias, A, B, sc, ta, rk)
    S_expected = ref.multi_lora_shrink(x.double(), _f64(A), ta, rk)
    assert k.shrink_split_k(5, 6, 256, 12, 3, 4) > 1, "the default plan must split K for this test to mean anything"
    for deterministic in (True, False):
        spy = _AtomicSpy(monkeypatch)
        S = torch.zeros(5, 3 * 12)
        if plan == "shrink":
            launches = k.plan_shrink(x, A, S, bt, rk, deterministic)
        elif plan == "fused":
            y = torch.full((5, 40), NAN)
            launches = k.plan_fused(x, W, bias, A, B, S, y, bt, sc, rk, deterministic)
        else:
            y = torch.nn.functional.linear(x, W, bias)
            launches = k.plan_composite(x, A, B, S, y, bt, sc, rk, deterministic)
        for launch in launches:
            launch.run()
        _close(S, S_expected, torch.float32, f"S deterministic={deterministic}")
        if plan != "shrink":
            _close(y, expected, torch.float32, f"y deterministic={deterministic}")
        if deterministic:
            assert spy.ops == [], f"deterministic {plan} plan added atomically: {spy.ops[:3]}"
        else:
            assert spy.ops, "the split-K shrink should add atomically"
            assert {sem for _, sem, _ in spy.ops} == {str(ir.MEM_SEMANTIC.RELAXED)}, spy.ops[:3]


@needs_interpreter
def test_launchers_honour_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the launchers pick the deterministic plans (no atomics)
    and give the same bits on every call; without it they split K (atomics), same values within tolerance."""
    x, A, B, W, bias, sc, rk, ta, bt = _decode_problem()
    expected = _expected(x, W, bias, A, B, sc, ta, rk)
    calls = {"shrink": lambda: k.lora_shrink_triton(x, A, bt, rk),
             "fused": lambda: k.multi_lora_linear_triton(x, W, bias, A, B, sc, bt, rk),
             "composite": lambda: k.multi_lora_linear_composite(x, W, bias, A, B, sc, bt, rk)}
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        spy = _AtomicSpy(monkeypatch)
        first = {name: f() for name, f in calls.items()}
        again = {name: f() for name, f in calls.items()}
        assert spy.ops == []
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    for name in calls:
        assert torch.equal(first[name], again[name]), name
    for name in ("fused", "composite"):
        _close(first[name], expected, torch.float32, name)
    spy = _AtomicSpy(monkeypatch)
    _close(calls["fused"](), expected, torch.float32, "fused, default mode")
    assert spy.ops, "the default mode splits the decode shrink's K (atomics)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (its atomics are unordered)")
def test_gpu_deterministic_mode_is_bitwise_reproducible():
    """On a GPU the split-K shrink's atomic adds land in any order; deterministic mode must not depend on it."""
    x, A, B, W, bias, sc, rk, ta = _problem(torch.bfloat16, T=48, in_f=4096, widths=(1024, 256, 256), L=64, R=16,
                                            ranks=tuple(range(1, 17)) * 4, case="distinct")
    xd, Wd, scd, rkd, Ad, Bd = _to("cuda", x, W, sc, rk, A, B)
    bt = LoRABatch.from_token_adapters(ta.cuda(), 64).op_args()
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        # warn_only: cuBLAS (the composite's base GEMM) raises in deterministic mode unless
        # CUBLAS_WORKSPACE_CONFIG was set before CUDA started; one stream keeps it reproducible here.
        torch.use_deterministic_algorithms(True, warn_only=True)
        for fn in (k.multi_lora_linear_triton, k.multi_lora_linear_composite):
            outs = [fn(xd, Wd, None, Ad, Bd, scd, bt, rkd) for _ in range(20)]
            assert all(torch.equal(o, outs[0]) for o in outs), fn.__name__
        S = [k.lora_shrink_triton(xd, Ad, bt, rkd) for _ in range(20)]
        assert all(torch.equal(s, S[0]) for s in S)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ------------------------------------------------------------------------------------------- devices

class _KernelSpy:
    """Stands in for a @triton.jit kernel: records whether each launch happens inside Launch.run."""

    def __init__(self, kernel, inside: list, calls: list):
        self.kernel, self.inside, self.calls = kernel, inside, calls
        self.__name__ = kernel.fn.__name__

    def __getitem__(self, grid):
        self.calls.append((self.__name__, self.inside[0] > 0))
        return self.kernel[grid]


@runs_kernels
def test_every_launch_goes_through_launch_run_on_the_inputs_device(monkeypatch):
    """Launch.run is where launches enter the tensors' CUDA device; no launcher may call a kernel any other way,
    and every tensor a launch touches (inputs, S, y) lives on x's device."""
    inside, calls, runs = [0], [], []
    for name in ("_multi_lora_shrink_kernel", "_multi_lora_expand_kernel", "_multi_lora_gemm_kernel"):
        monkeypatch.setattr(k, name, _KernelSpy(getattr(k, name), inside, calls))
    orig_run = Launch.run

    def run(launch):
        runs.append(launch)
        inside[0] += 1
        try:
            orig_run(launch)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(Launch, "run", run)
    x, A, B, W, bias, sc, rk, ta = _problem(torch.float32, T=19, widths=(8, 16, 8, 8, 24))  # 5 slices: 2 launches
    x, W, bias, sc, rk, A, B = _to(DEV, x, W, bias, sc, rk, A, B)
    bt = LoRABatch.from_token_adapters(ta, 6, device=DEV).op_args()
    y = k.multi_lora_linear_triton(x, W, bias, A, B, sc, bt, rk)
    y2 = k.multi_lora_linear_composite(x, W, bias, A, B, sc, bt, rk)
    S = k.lora_shrink_triton(x, A, bt, rk)
    k.lora_expand_triton(S, B, bt, y2, sc, rk, 0)
    assert y.device == y2.device == S.device == x.device
    names = {n for n, _ in calls}
    assert names == {"_multi_lora_shrink_kernel", "_multi_lora_expand_kernel", "_multi_lora_gemm_kernel"}
    assert all(ok for _, ok in calls), f"launched outside Launch.run: {[n for n, ok in calls if not ok]}"
    assert len(calls) == len(runs)
    for launch in runs:
        devices = {v.device for v in launch.args.values() if isinstance(v, torch.Tensor)}
        assert devices == {x.device}, (launch.describe(), devices)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (inputs on a non-current device)")
def test_gpu_inputs_on_a_device_that_is_not_current():
    """x on cuda:1 while cuda:0 is current (a model split over GPUs): launches and buffers follow the inputs."""
    x, A, B, W, bias, sc, rk, ta = _problem(torch.bfloat16, T=70, in_f=512, widths=(256, 64, 64), L=8, R=16,
                                            ranks=(16, 8, 0, 1, 16, 8, 4, 1))
    expected = _expected(x, W, bias, A, B, sc, ta, rk)
    dev = torch.device("cuda", 1)
    xd, Wd, bd, scd, rkd, Ad, Bd = _to(dev, x, W, bias, sc, rk, A, B)
    bt = LoRABatch.from_token_adapters(ta.to(dev), 8).op_args()
    with torch.cuda.device(0):
        for fn in (k.multi_lora_linear_triton, k.multi_lora_linear_composite):
            y = fn(xd, Wd, bd, Ad, Bd, scd, bt, rkd)
            assert y.device == dev
            torch.cuda.synchronize(dev)
            torch.testing.assert_close(y.double().cpu(), expected, atol=4e-2, rtol=4e-2, msg=fn.__name__)


# ------------------------------------------------------------------------------------------- configs

@runs_kernels
@pytest.mark.parametrize("elem_size,dtype", [(2, torch.bfloat16), (4, torch.float32)], ids=["16bit", "fp32"])
def test_every_gemm_tile_matches_reference(monkeypatch, elem_size, dtype):
    """Each shipped fused-GEMM tile (the launcher picks by T and out) on one problem: partial tiles in both dims,
    several slots per tile, 4 slices in the epilogue plus an expand launch for the fifth."""
    x, A, B, W, bias, sc, rk, ta = _problem(dtype, T=37, widths=(24, 8, 8, 16, 8), ranks=(0, 12, 5, 7, 1, 9))
    expected = _expected(x, W, bias, A, B, sc, ta, rk)
    args = _to(DEV, x, W, bias, A, B, sc)
    bt = LoRABatch.from_token_adapters(ta, 6, device=DEV).op_args()
    for cfg in k._GEMM_TILES[elem_size]:
        monkeypatch.setattr(k, "_gemm_config", lambda T, N, e, cfg=cfg: cfg)
        _close(k.multi_lora_linear_triton(*args, bt, rk.to(DEV)).cpu(), expected, dtype, f"tile {cfg}")


def test_aot_launches_cover_every_config():
    """The ahead-of-time check compiles every config the launchers can pick: each GEMM tile with and without
    bias / ranks and with 1 or several slices, the shrink's atomic and plain-store variants, the expand's two
    BLOCK_N at both tile heights, and whatever the static report compiles."""
    launches = list(aot_cases.aot_launches("multi_lora"))
    gemm = {}
    for l in launches:
        if l.kernel is k._multi_lora_gemm_kernel:
            c = l.constexprs
            tile = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], l.num_warps, l.num_stages, l.args["x_ptr"].element_size())
            gemm.setdefault(tile, set()).add((c["HAS_BIAS"], c["HAS_RANKS"], c["NUM_SLICES"], str(c["CT"])))
    for elem, tiles in k._GEMM_TILES.items():
        dtypes = (torch.float32,) if elem == 4 else (torch.float16, torch.bfloat16)
        cts = {str(k._compute_type(d)[0]) for d in dtypes}  # the interpreter runs bf16 dots in fp32
        for bm, bn, bk, _, warps, stages, _ in tiles:
            variants = gemm.get((bm, bn, bk, warps, stages, elem), set())
            assert variants == {(b, r, ns, ct) for b in (False, True) for r in (False, True) for ns in (1, k.MAX_SLICES)
                                for ct in cts}, (elem, bm, bn, bk)
    assert {l.constexprs["ATOMIC"] for l in launches if l.kernel is k._multi_lora_shrink_kernel} == {False, True}
    expand = {(l.constexprs["BLOCK_M"], l.constexprs["BLOCK_N"], l.args["y_ptr"].element_size())
              for l in launches if l.kernel is k._multi_lora_expand_kernel}
    assert expand == {(bm, bn, e) for bm in (16, 64) for e, bns in k._EXPAND_BLOCK_N.items() for bn in bns}
    keys = {(l.describe(), tuple(sorted(l.signature().items()))) for l in launches}
    for case, l in aot_cases.report_launches("multi_lora"):
        assert (l.describe(), tuple(sorted(l.signature().items()))) in keys, case


def _meta(T, K, widths, L=64, R=16):
    return aot_cases.multi_lora_meta(T, K, widths, R, L, torch.bfloat16, True, False)


def _active_programs(launch: Launch, T: int) -> int:
    """Programs that do work when every token is on one slot (the fewest tiles: cdiv(T, BLOCK_M))."""
    tiles = triton.cdiv(T, launch.constexprs["BLOCK_M"])
    return tiles * launch.grid[1]


@pytest.mark.parametrize("K,widths", [(4096, (4096,)), (4096, (4096, 1024, 1024)), (14336, (4096,))],
                         ids=["q_4096", "qkv_4096", "down_14336"])
@pytest.mark.parametrize("T", [64, 128, 256, 512, 1000])
def test_grids_fill_the_gpu(K, widths, T):
    """Llama-3-8B layers, bf16, rank 16, 64 slots: the fused GEMM has at least one CTA per SM of an H100 (132),
    and so do the shrink and the expand even when every token is on one slot (the fewest tiles), while the
    split shrink's grid stays bounded (programs of unused tiles exit at once)."""
    x, W, bias, A, B, S, y, bt, sc, ranks = _meta(T, K, widths)
    shrink, gemm = k.plan_fused(x, W, bias, A, B, S, y, bt, sc, ranks)
    (expand,) = k.plan_expand(S, B, y, 0, bt, sc, ranks)
    assert gemm.grid[0] >= k._NUM_SMS, (gemm.describe(), gemm.grid)
    assert _active_programs(expand, T) >= k._NUM_SMS, (expand.describe(), expand.grid)
    # 125: 95% of the SMs. A one-slot batch of 64 or 256 tokens has 4 tiles x 32 K-blocks = 128 shrink programs.
    assert _active_programs(shrink, T) >= 125, (shrink.describe(), shrink.grid)
    assert shrink.grid[0] * shrink.grid[1] <= k._MAX_PROGRAMS
    det_shrink = k.plan_shrink(x, A, S, bt, ranks, deterministic=True)[0]
    assert det_shrink.args["split_k"] == 1 and not det_shrink.constexprs["ATOMIC"]


def test_report_launches():
    """The static report's multi-adapter cases: T in {1, 64, 256, 4096} x {q, qkv}, the fused path's shrink and
    GEMM and the composite's shrink and expand, each with the config its launcher picks, and both again with
    DoRA's per-slot column scale ("[fused,col_scale]", "[composite,col_scale]")."""
    cases = {}
    for case, launch in aot_cases.report_launches("multi_lora"):
        assert isinstance(launch, Launch)
        if "[bwd]" not in case:  # the backward's cases: tests/test_kernels_multi_lora_grad.py
            cases.setdefault(case, []).append(launch)
    assert len(cases) == 2 * 2 * 4 * 2
    for T in (1, 64, 256, 4096):
        for layer in ("q 4096->4096 ", "qkv 4096->4096+1024+1024 "):
            for variant, cs in (("", False), (",col_scale", True)):
                fused = cases[f"multi_lora_linear[fused{variant}] {layer}T={T} r=16 bf16 L=64"]
                composite = cases[f"multi_lora_linear[composite{variant}] {layer}T={T} r=16 bf16 L=64"]
                assert [la.kernel for la in fused] == [k._multi_lora_shrink_kernel, k._multi_lora_gemm_kernel]
                assert [la.kernel for la in composite] == [k._multi_lora_shrink_kernel, k._multi_lora_expand_kernel]
                assert fused[1].constexprs["HAS_COL_SCALE"] == cs == composite[1].constexprs["HAS_COL_SCALE"]


# ------------------------------------------------------------------------------------------- layering

def test_kernels_do_not_import_ops():
    """Import direction: kernels never import from ops; the tiling helpers live in the kernel layer, free of
    Triton (LoRABatch needs them without it), and ops/multi_lora.py re-exports the same functions."""
    import lora_kernels.kernels.tiling as tiling
    import lora_kernels.ops.multi_lora as ops
    for mod in (k, tiling):
        imported = set()
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not any(m.startswith("lora_kernels.ops") for m in imported), (mod.__name__, imported)
        if mod is tiling:
            assert not any(m.split(".")[0] == "triton" for m in imported), imported
    assert ops.tile_block_m is tiling.tile_block_m is k.tile_block_m
    assert ops.num_tiles is tiling.num_tiles is k.num_tiles
