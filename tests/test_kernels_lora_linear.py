"""The single-adapter Triton launchers beyond the op-level tests of test_lora_linear.py: the device guard,
strided inputs, deterministic mode, relaxed atomics, grid fill, the composite path and every shipped GEMM
config. Numerics run under TRITON_INTERPRET=1 on CPU against the float64 reference; what the interpreter
cannot show (atomics in the compiled code) is read from the kernels' Triton IR in a subprocess."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_to_ref
from test_lora_linear import make_inputs, reference_outputs

triton = pytest.importorskip("triton", reason="these tests run the Triton kernels")

from lora_kernels.dropout import SEED_LOW  # noqa: E402
from lora_kernels.kernels import _launch, aot_cases, lora_linear as klk  # noqa: E402
from lora_kernels.backends import TRITON_INTERPRETED  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
interpreted = pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs Triton kernels on CPU: needs TRITON_INTERPRET=1")
SEED = SEED_LOW + 4242


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every Triton output buffer starts as NaN, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(klk, "POISON_OUTPUTS", True)


@contextlib.contextmanager
def deterministic(on: bool):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def check_launchers(x, W, b, A, B, dy, scaling=0.75, dropout_p=0.0, S=None, composite=False, name=""):
    """Forward and backward launchers on (possibly strided) 2-D inputs vs. the float64 reference.
    `S` replaces the forward's S as the backward's input (to pass it strided)."""
    seed = SEED if dropout_p > 0 else None
    fwd = klk.lora_linear_fwd_composite if composite else klk.lora_linear_fwd_triton
    bwd = klk.lora_linear_bwd_composite if composite else klk.lora_linear_bwd_triton
    y, S_out = fwd(x, W, b, A, B, scaling, dropout_p, seed)
    y_ref, dx_ref, dA_ref, dB_ref = reference_outputs(x, W, b, A, B, dy, scaling, dropout_p, seed)
    dtype = x.dtype
    assert_close_to_ref(y, y_ref, dtype, f"{name} y")
    dx, dA, dB = bwd(dy, x, W, A, B, S_out if S is None else S, scaling, dropout_p, seed, True, True, True)
    for n, got, ref, t in (("dx", dx, dx_ref, x), ("dA", dA, dA_ref, A), ("dB", dB, dB_ref, B)):
        assert got.dtype == t.dtype, f"{name} {n}: dtype {got.dtype} != {t.dtype}"
        assert_close_to_ref(got, ref, dtype, f"{name} {n}")
    return y, S_out, dx, dA, dB


# ---------------------------------------------------------------------------------------------------
# 1. Device guard
# ---------------------------------------------------------------------------------------------------

class _RecordingKernel:
    """Stands in for a @triton.jit kernel: records the CUDA device that is current when it launches."""

    def __init__(self, state):
        self.state, self.launched_on = state, []

    def __getitem__(self, grid):
        return lambda **kw: self.launched_on.append(self.state["current"])


def _fake_cuda(index):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(4, device=f"cuda:{index}")


def test_launch_runs_under_the_device_of_its_tensors(monkeypatch):
    """Launch.run makes the tensors' CUDA device current around the launch (x on cuda:1 while cuda:0 is
    current), skips the guard when it already is, and never enters it for CPU tensors."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def guard(index):
        state["entered"].append(index)
        old, state["current"] = state["current"], index
        try:
            yield
        finally:
            state["current"] = old

    monkeypatch.setattr(_launch, "_current_cuda_device", lambda: state["current"])
    monkeypatch.setattr(_launch, "_cuda_device_guard", guard)
    kernel = _RecordingKernel(state)
    on_cuda1 = _launch.Launch(kernel, (2,), dict(x_ptr=_fake_cuda(1), n=4))
    assert on_cuda1.device() == torch.device("cuda:1")
    on_cuda1.run()
    assert kernel.launched_on == [1] and state["entered"] == [1] and state["current"] == 0
    state["current"] = 1  # already current: no guard
    on_cuda1.run()
    assert kernel.launched_on == [1, 1] and state["entered"] == [1]
    _launch.Launch(kernel, (2,), dict(n=4, x_ptr=torch.zeros(4))).run()  # CPU: no guard
    assert kernel.launched_on == [1, 1, 1] and state["entered"] == [1]
    _launch.Launch(kernel, (0,), dict(x_ptr=_fake_cuda(1))).run()  # empty grid: nothing launches
    assert kernel.launched_on == [1, 1, 1]


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_every_planned_launch_and_buffer_is_on_x_device(det):
    """Plans built from tensors on cuda:1 (fake tensors: no GPU needed) put every launch there, workspaces
    and outputs included, so Launch.run's guard covers all of them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        dev = "cuda:1"
        for M in (1, 200):
            x, W, b = (torch.empty(*s, device=dev) for s in ((M, 4096), (1024, 4096), (1024,)))
            A, B = torch.empty(16, 4096, device=dev), torch.empty(1024, 16, device=dev)
            fwd, y, S = klk.plan_fwd(x, W, b, A, B, 2.0, 0.1, SEED, det)
            bwd, dx, dA, dB = klk.plan_bwd(y, x, W, A, B, S, 2.0, 0.1, SEED, True, True, True, det)
            cfwd, S2 = klk.plan_fwd_composite(x, A, B, y, 2.0, 0.1, SEED, det)
            cbwd, dA2, dB2 = klk.plan_bwd_composite(y, x, A, B, S, dx, 2.0, 0.1, SEED, True, True, det)
            for launch in fwd + bwd + cfwd + cbwd:
                tensors = [v for v in launch.args.values() if isinstance(v, torch.Tensor)]
                assert {t.device for t in tensors} == {torch.device(dev)}, launch.describe()
            for t in (y, S, dx, dA, dB, S2, dA2, dB2):
                assert t.device == torch.device(dev)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: x on cuda:1 while cuda:0 is current")
@pytest.mark.parametrize("composite", [False, True], ids=["fused", "composite"])
def test_launchers_on_second_gpu(composite):
    torch.cuda.set_device(0)
    x, W, b, A, B, dy = make_inputs(70, 96, 80, 16, torch.bfloat16, torch.float32, device="cuda:1")
    y, S, dx, dA, dB = check_launchers(x, W, b, A, B, dy, dropout_p=0.1, composite=composite)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert {t.device for t in (y, S, dx, dA, dB)} == {torch.device("cuda:1")}


# ---------------------------------------------------------------------------------------------------
# 2. Strides: every pointer is read with its own strides
# ---------------------------------------------------------------------------------------------------

def _strided_inputs(M, K, N, R, dtype, lora_dtype):
    """x a column slice, weight and A transposed-contiguous, B a column slice, bias stride 2."""
    x, W, b, A, B, dy = make_inputs(M, K, N, R, dtype, lora_dtype)
    x_s = torch.empty(M, K + 5, dtype=dtype)[:, 2:K + 2]
    x_s.copy_(x)
    W_t = W.t().contiguous().t()                                       # strides (1, N)
    b_s = torch.zeros(2 * N, dtype=dtype)[::2]
    b_s.copy_(b)
    A_t = A.t().contiguous().t()                                       # strides (1, R)
    B_s = torch.zeros(N, R + 3, dtype=lora_dtype)[:, 1:R + 1]
    B_s.copy_(B)
    assert b_s.stride() == (2,) and W_t.stride() == (1, N) and A_t.stride() == (1, R) and B_s.stride(0) == R + 3
    return x_s, W_t, b_s, A_t, B_s, dy


@interpreted
@pytest.mark.parametrize("composite", [False, True], ids=["fused", "composite"])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype,lora_dtype,M", [(torch.float32, torch.float32, 37), (torch.bfloat16, torch.float32, 5)],
                         ids=["fp32-M37", "bf16-fp32lora-M5"])
def test_strided_inputs(composite, det, dtype, lora_dtype, M):
    """Strided bias (the issue's 2.75 error), S, weight, A, B and x, and a stride-0 dy."""
    x, W, b, A, B, dy = _strided_inputs(M, 70, 150, 20, dtype, lora_dtype)
    with deterministic(det):
        _, S, *_ = check_launchers(x, W, b, A, B, dy, dropout_p=0.2, composite=composite, name="strided")
        # S as a column slice and as a transposed-contiguous view; dy expanded from one row (stride 0)
        S_slice = torch.full((M, 20 + 4), float("nan"))[:, 2:22]
        S_slice.copy_(S)
        S_t = S.t().contiguous().t()
        dy0 = dy[:1].expand(M, -1)
        assert dy0.stride(0) == 0
        for S_in in (S_slice, S_t):
            check_launchers(x, W, b, A, B, dy0, dropout_p=0.2, S=S_in, composite=composite, name="strided S")


# ---------------------------------------------------------------------------------------------------
# 3. Determinism and 4. relaxed atomics
# ---------------------------------------------------------------------------------------------------

_IR_SCRIPT = r"""
import json, torch
from lora_kernels.kernels import aot_cases, lora_linear as k
out, seen = {"False": {}, "True": {}}, set()
for det in (False, True):
    for M, K, N, R in ((1, 4096, 4096, 16), (16, 4096, 1024, 64), (300, 512, 1024, 16), (8192, 4096, 4096, 16)):
        for lora_dtype in (torch.bfloat16, torch.float32):
            plans = aot_cases.lora_linear_case(M, K, N, R, torch.bfloat16, lora_dtype, 0.1, det)
            x, W, _, A, B, S, G = aot_cases.lora_linear_meta(M, K, N, R, torch.bfloat16, lora_dtype)
            plans["bwd no dB"] = k.plan_bwd(G, x, W, A, B, S, 2.0, 0.1, None, True, True, False, det)[0]
            plans["bwd dB only"] = k.plan_bwd(G, x, W, A, B, S, 2.0, 0.1, None, False, False, True, det)[0]
            for launches in plans.values():
                for l in launches:
                    key = (det, l.describe(), str(sorted(l.signature().items())))
                    if key not in seen:
                        seen.add(key)
                        out[str(det)][l.describe()] = {f"{op}.{sem}": n for (op, sem), n in l.atomic_ops().items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def atomics_in_ir():
    """{"False"|"True" (deterministic): {launch: {"fadd.relaxed": n}}} over plans of decode to prefill sizes,
    read from each launch's Triton IR (Launch.atomic_ops) in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _IR_SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_deterministic_plans_have_no_atomics(atomics_in_ir):
    det = {k: v for k, v in atomics_in_ir["True"].items() if v}
    assert not det, f"atomic adds under deterministic mode: {det}"
    # The same cases without deterministic mode do split with atomics (so the check above can fail).
    atomic = {k for k, v in atomics_in_ir["False"].items() if v}
    assert any(k.startswith(n) for k in atomic for n in ("_lora_shrink_kernel", "_lora_bwd_ds_db_kernel",
                                                          "_lora_bwd_da_kernel")), atomic


def test_every_atomic_is_relaxed(atomics_in_ir):
    sems = {op for plans in atomics_in_ir.values() for ops in plans.values() for op in ops}
    assert sems == {"fadd.relaxed"}, sems


class _AtomicCounter:
    """Counts the atomic read-modify-writes the interpreter executes, by memory semantics."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter
        self.counts = {}
        builder = interpreter.interpreter_builder
        original = builder.create_atomic_rmw

        def counting(rmw_op, ptr, val, mask, sem, scope):
            self.counts[str(sem)] = self.counts.get(str(sem), 0) + 1
            return original(rmw_op, ptr, val, mask, sem, scope)
        monkeypatch.setattr(builder, "create_atomic_rmw", counting)


@interpreted
@pytest.mark.parametrize("composite", [False, True], ids=["fused", "composite"])
def test_deterministic_mode_runs_no_atomics_and_repeats_bitwise(monkeypatch, composite):
    """Small tiles and a small program target so that every reduction splits (split-K shrink and GEMM, dS
    over n-blocks, split-M dA and dB): with atomics by default, without under deterministic mode, where two
    runs give the same bits (the interpreter runs programs in order, so only the count can show a race)."""
    monkeypatch.setattr(klk, "_GEMM_CONFIGS", {k: (16, 16, 16, 2, 4, 2) for k in klk._GEMM_CONFIGS})
    monkeypatch.setattr(klk, "_ds_db_blocks", lambda *args: (16, 16, 4))
    monkeypatch.setattr(klk, "_TARGET_PROGRAMS", 64)
    x, W, b, A, B, dy = make_inputs(40, 130, 70, 20, torch.float32)
    counter = _AtomicCounter(monkeypatch)
    check_launchers(x, W, b, A, B, dy, dropout_p=0.1, composite=composite, name="atomic")
    assert counter.counts and set(counter.counts) == {str(counter_sem())}, counter.counts
    counter.counts.clear()
    with deterministic(True):
        runs = [check_launchers(x, W, b, A, B, dy, dropout_p=0.1, composite=composite, name="deterministic")
                for _ in range(2)]
    assert counter.counts == {}, f"atomics under deterministic mode: {counter.counts}"
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def counter_sem():
    from triton._C.libtriton import ir
    return ir.MEM_SEMANTIC.RELAXED


# ---------------------------------------------------------------------------------------------------
# 5. Grid fill and the one-pass dS/dB
# ---------------------------------------------------------------------------------------------------

def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("M", [16, 17, 64, 65, 128, 200, 512, 513, 1024])
@pytest.mark.parametrize("K,N", [(4096, 1024), (4096, 4096), (14336, 4096), (4096, 14336)])
def test_gemm_grid_fills_an_h100(M, K, N):
    """Every GEMM (forward y, backward dx) with M >= 16 rows and >= 1024 output columns has at least one CTA
    per SM of a 132-SM H100, by tiles or by splitting K."""
    x, W, A, B = _meta(M, K), _meta(N, K), _meta(16, K), _meta(N, 16)
    S, G = _meta(M, 16, dtype=torch.float32), _meta(M, N)
    for dropout in (0.0, 0.1):
        seed = SEED if dropout else None
        launches = (klk.plan_fwd(x, W, None, A, B, 2.0, dropout, seed)[0]
                    + klk.plan_bwd(G, x, W, A, B, S, 2.0, dropout, seed, True, False, False)[0])
        gemms = [l for l in launches if l.kernel_name() == "_gemm_lora_kernel"]
        assert len(gemms) == 2
        for g in gemms:
            assert g.grid[0] * g.grid[1] >= klk._FILL_CTAS, (g.describe(), g.grid, g.args["N"])


def test_backward_reads_G_once_for_dS_and_dB():
    """Outside deterministic mode one kernel computes dS and dB (plus the dx GEMM: G read twice in all);
    dB receives at most a few adds per element, not M/32 as before."""
    M, K, N, R = 8192, 4096, 4096, 16
    x, W, A, B, S, G = _meta(M, K), _meta(N, K), _meta(R, K), _meta(N, R), _meta(M, R, dtype=torch.float32), _meta(M, N)
    launches = klk.plan_bwd(G, x, W, A, B, S, 2.0, 0.0, None, True, True, True)[0]
    readers = [l.kernel_name() for l in launches if any(v is G for v in l.args.values())]
    assert sorted(readers) == ["_gemm_lora_kernel", "_lora_bwd_ds_db_kernel"], readers
    ds_db = next(l for l in launches if l.kernel_name() == "_lora_bwd_ds_db_kernel")
    assert ds_db.constexprs["COMPUTE_DS"] and ds_db.grid[2] <= 16  # adds per dB element
    assert ds_db.grid[0] * ds_db.grid[1] * ds_db.grid[2] >= klk._FILL_CTAS


# ---------------------------------------------------------------------------------------------------
# Composite path and the shipped GEMM configs
# ---------------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("R", [1, 16, 40])
def test_composite_matches_reference(dropout_p, bias, R):
    x, W, b, A, B, dy = make_inputs(19, 45, 33, R, torch.float32, bias=bias)
    check_launchers(x, W, b, A, B, dy, dropout_p=dropout_p, composite=True, name="composite")


@interpreted
@pytest.mark.parametrize("M", [0, 6], ids=["M0", "M6-noncontig"])
def test_composite_bf16_empty_and_noncontiguous(M):
    x, W, b, A, B, dy = make_inputs(M, 40, 24, 3, torch.bfloat16, torch.float32, x_noncontig=M > 0)
    check_launchers(x, W, b, A, B, dy, dropout_p=0.3, composite=True, name="composite")


def test_gemm_configs_pick_first_and_every_config_in_aot_check():
    shipped = set(klk._GEMM_CONFIGS.values())
    for M in (1, 16, 17, 200, 512, 513, 8192):
        for elem in (2, 4):
            for dropout in (False, True):
                cfgs = klk.gemm_configs(M, elem, dropout)
                assert cfgs[0] == klk._GEMM_CONFIGS[(klk._gemm_class(M), elem, dropout)]
                assert len(set(cfgs)) == len(cfgs) and set(cfgs) <= shipped
    compiled = set()
    for launch in aot_cases.aot_launches("lora_linear"):
        if launch.kernel_name() == "_gemm_lora_kernel":
            c = launch.constexprs
            compiled.add((c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], launch.num_warps, launch.num_stages))
    assert shipped <= compiled, shipped - compiled


@interpreted
@pytest.mark.parametrize("elem_dtype,dropout_p", [(torch.float32, 0.2), (torch.float16, 0.0)],
                         ids=["fp32-p0.2", "fp16"])
def test_every_gemm_config_is_correct(elem_dtype, dropout_p):
    """The configs a tuner may time (gemm_configs) all give the reference's answer, split-K included."""
    x, W, b, A, B, dy = make_inputs(21, 80, 72, 5, elem_dtype)
    seed = SEED if dropout_p else None
    y_ref, dx_ref, dA_ref, dB_ref = reference_outputs(x, W, b, A, B, dy, 0.5, dropout_p, seed)
    for cfg in klk.gemm_configs(21, x.element_size(), dropout_p > 0):
        y, S = klk.lora_linear_fwd_triton(x, W, b, A, B, 0.5, dropout_p, seed, gemm_config=cfg)
        assert_close_to_ref(y, y_ref, elem_dtype, f"y {cfg}")
        dx, _, _ = klk.lora_linear_bwd_triton(dy, x, W, A, B, S, 0.5, dropout_p, seed, True, False, False,
                                              gemm_config=cfg)
        assert_close_to_ref(dx, dx_ref, elem_dtype, f"dx {cfg}")


@interpreted
def test_multi_block_ds_db_and_split_k_gemm(monkeypatch):
    """Small tiles: the dS partials of several n-blocks, several M-ranges of dB with staggered starts, a
    partial last range, and split-K GEMMs whose bias, LoRA term and dropout must count once."""
    monkeypatch.setattr(klk, "_GEMM_CONFIGS", {k: (16, 16, 16, 2, 4, 2) for k in klk._GEMM_CONFIGS})
    monkeypatch.setattr(klk, "_ds_db_blocks", lambda *args: (16, 16, 4))
    monkeypatch.setattr(klk, "_TARGET_PROGRAMS", 15)
    x, W, b, A, B, dy = make_inputs(150, 100, 75, 18, torch.float32)
    launches = klk.plan_bwd(dy, x, W, A, B, torch.zeros(150, 18), 1.0, 0.0, None, True, True, True)[0]
    ds_db = next(l for l in launches if l.kernel_name() == "_lora_bwd_ds_db_kernel")
    gemm = next(l for l in launches if l.kernel_name() == "_gemm_lora_kernel")
    assert ds_db.grid[0] > 1 and ds_db.grid[2] > 1 and ds_db.constexprs["DS_ATOMIC"] and gemm.grid[1] > 1
    assert triton.cdiv(150, 16) % ds_db.args["m_blocks_per_split"] != 0  # a partial last M-range
    check_launchers(x, W, b, A, B, dy, dropout_p=0.15, name="multi-block")
