"""Measured dispatch (lora_kernels/dispatch.py) and the eager fast path of lora_linear: verification before
trust, the persistent cache across processes, no tuning where it must not happen, explicit backends."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, dispatch, reference
from lora_kernels.dropout import new_seed
from lora_kernels.ops import lora_linear as ops

from conftest import assert_close_to_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and a fresh dispatch state; LORA_KERNELS_TUNE as each test sets it."""
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LORA_KERNELS_TUNE", raising=False)
    dispatch.reset()
    yield tmp_path
    dispatch.reset()


def tune(monkeypatch, on: bool) -> None:
    monkeypatch.setenv("LORA_KERNELS_TUNE", "1" if on else "0")
    dispatch.reset()


def inputs(M=9, K=24, N=20, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    A = torch.randn(r, K, generator=g) / K ** 0.5
    B = torch.randn(N, r, generator=g)
    return x, W, b, A, B


def reference_y(x, W, b, A, B, s):
    y, _ = reference.lora_linear_forward(*(t.double() for t in (x, W, b, A, B)), s)
    return y


def entries(path) -> dict:
    files = [f for f in os.listdir(path) if f.startswith("dispatch-") and f.endswith(".json")]
    assert len(files) == 1, files
    with open(os.path.join(path, files[0])) as f:
        return json.load(f)["entries"]


# ----------------------------------------------------------------------------------------------------
# Defaults and explicit backends
# ----------------------------------------------------------------------------------------------------

def test_backend_none_runs_the_cpu_default_without_tuning(cache, monkeypatch):
    """Untuned CPU (LORA_KERNELS_TUNE unset): backend=None runs backends.CPU_DEFAULT, and writes no cache."""
    calls = []
    name = backends.default_backend("cpu")
    fwd, bwd = ops.IMPLS[name]
    monkeypatch.setitem(ops.IMPLS, name, (lambda *a: calls.append(name) or fwd(*a), bwd))
    x, W, b, A, B = inputs()
    y = lk.lora_linear(x, W, b, A, B, 0.5)
    assert calls == [name]
    assert_close_to_ref(y, reference_y(x, W, b, A, B, 0.5), torch.float32, "y")
    assert os.listdir(cache) == []


def test_explicit_backend_bypasses_dispatch(cache, monkeypatch):
    tune(monkeypatch, True)

    def boom(*a, **k):
        raise AssertionError("dispatch.choose called for an explicit backend")

    monkeypatch.setattr(dispatch, "choose", boom)
    x, W, b, A, B = inputs()
    for backend in backends.available_backends("cpu"):
        y = lk.lora_linear(x, W, b, A.requires_grad_(), B, 0.5, backend=backend)
        y.sum().backward()
        assert_close_to_ref(y, reference_y(x, W, b, A, B, 0.5), torch.float32, backend)
    assert os.listdir(cache) == []


# ----------------------------------------------------------------------------------------------------
# Verification before trust
# ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not backends.TRITON_INTERPRETED, reason="the Triton candidates run on CPU only under "
                    "TRITON_INTERPRET=1 (make test sets it)")
def test_wrong_candidate_is_rejected_and_named(cache, monkeypatch):
    """A Triton forward made deliberately wrong is dropped with a warning naming it; the answer stays right."""
    from lora_kernels.kernels import lora_linear as kernels
    tune(monkeypatch, True)
    real = kernels.lora_linear_fwd_triton

    def garbage(*args, **kwargs):
        y, S = real(*args, **kwargs)
        return y * 3 + 1, S

    monkeypatch.setattr(kernels, "lora_linear_fwd_triton", garbage)
    x, W, b, A, B = inputs(M=5, K=20, N=16, r=3)
    with pytest.warns(RuntimeWarning, match=r"dropped candidate 'triton.*lora_linear/fwd"):
        y = lk.lora_linear(x, W, b, A, B, 0.5)
    assert_close_to_ref(y, reference_y(x, W, b, A, B, 0.5), torch.float32, "y")
    (entry,) = [e for k, e in entries(cache).items() if k.startswith("lora_linear/fwd/")]
    assert entry["choice"] != "triton" and "triton" in entry["rejected"]
    assert "differs from the reference" in entry["rejected"]["triton"]
    assert "torch" in entry["ms"] and "triton" not in entry["ms"]
    # The choice is cached: the next call neither re-tunes nor warns again.
    monkeypatch.setattr(dispatch, "_tune", lambda *a, **k: pytest.fail("tuned twice for one key"))
    lk.lora_linear(x, W, b, A, B, 0.5)


def test_raising_candidate_is_rejected(cache, monkeypatch):
    tune(monkeypatch, True)
    if "native" not in backends.available_backends("cpu"):
        pytest.skip("needs a second CPU candidate: the lora_kernels._C extension is not built")

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setitem(ops.IMPLS, "native", (broken, ops.IMPLS["native"][1]))
    x, W, b, A, B = inputs()
    with pytest.warns(RuntimeWarning, match="dropped candidate 'native'.*simulated kernel failure"):
        y = lk.lora_linear(x, W, b, A, B, 0.5)
    assert_close_to_ref(y, reference_y(x, W, b, A, B, 0.5), torch.float32, "y")


def test_backward_candidates_are_verified_too(cache, monkeypatch):
    tune(monkeypatch, True)
    if "native" not in backends.available_backends("cpu"):
        pytest.skip("needs a second CPU candidate: the lora_kernels._C extension is not built")
    fwd, bwd = ops.IMPLS["native"]

    def bad_bwd(*a):
        dx, dA, dB = bwd(*a)
        return dx, None if dA is None else dA * 2, dB

    monkeypatch.setitem(ops.IMPLS, "native", (fwd, bad_bwd))
    x, W, b, A, B = inputs()
    A.requires_grad_()
    with pytest.warns(RuntimeWarning, match="dropped candidate 'native' for lora_linear/bwd"):
        lk.lora_linear(x, W, b, A, B, 0.5).sum().backward()
    dA_ref = reference.lora_linear_backward(torch.ones(9, 20, dtype=torch.float64), *(t.double() for t in (x, W)),
                                            A.detach().double(), B.double(), 0.5)[1]
    assert_close_to_ref(A.grad, dA_ref, torch.float32, "dA")


def test_non_finite_inputs_do_not_decide(cache, monkeypatch):
    """NaN inputs leave nothing to verify against: the call runs the default and nothing is cached."""
    tune(monkeypatch, True)
    x, W, b, A, B = inputs()
    x[0, 0] = float("nan")
    lk.lora_linear(x, W, b, A, B, 0.5)
    assert not any(f.endswith(".json") for f in os.listdir(cache))


# ----------------------------------------------------------------------------------------------------
# Where tuning must not happen
# ----------------------------------------------------------------------------------------------------

def test_deterministic_mode_only_takes_reproducible_choices(cache, monkeypatch):
    cands = [dispatch.Candidate("safe", lambda: None), dispatch.Candidate("fast", lambda: None, deterministic=False)]
    table = dispatch._table(torch.device("cpu"))
    table.entries["op/fwd/m=1"] = {"choice": "fast"}
    pick = lambda: dispatch.choose("op", "fwd", {"m": 1}, torch.device("cpu"), cands, "safe", "safe", (),
                                   lambda out: (), torch.float32).name
    assert pick() == "fast"
    dispatch._chosen.clear()
    tune(monkeypatch, True)
    dispatch._table(torch.device("cpu")).entries["op/fwd/m=1"] = {"choice": "fast"}
    monkeypatch.setattr(dispatch, "_tune", lambda *a, **k: pytest.fail("tuned under deterministic mode"))
    torch.use_deterministic_algorithms(True)
    try:
        assert pick() == "safe"
        dispatch._table(torch.device("cpu")).entries.clear()
        assert pick() == "safe"
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_tuning_while_compiling(cache, monkeypatch):
    """torch.compile(fullgraph=True) traces the registered op with backend="auto"; nothing is timed while
    tracing (the compiled graph may tune when it runs, outside tracing)."""
    tune(monkeypatch, True)
    real = dispatch._tune
    seen = []

    def spy(*a, **k):
        seen.append(torch.compiler.is_compiling())
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "_tune", spy)
    x, W, b, A, B = inputs()
    A.requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda x, A: lk.lora_linear(x, W, b, A, B, 0.5), fullgraph=True, backend="eager")
    y = f(x, A)
    y.sum().backward()
    assert seen and not any(seen)  # tuned when the compiled graph ran, never while tracing
    assert_close_to_ref(y, reference_y(x, W, b, A.detach(), B, 0.5), torch.float32, "y")


def test_compile_traces_the_registered_ops(cache):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    x, W, b, A, B = inputs()
    torch._dynamo.reset()
    f = torch.compile(lambda x: lk.lora_linear(x, W, b, A, B, 0.5, backend="torch"), fullgraph=True,
                      backend=backend)
    f(x)
    assert any("lora_kernels.lora_linear_fwd" in g for g in graphs), graphs


# ----------------------------------------------------------------------------------------------------
# The eager fast path and the registered op
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fast_path_equals_registered_op(backend, dropout_p):
    """lk.lora_linear's eager path and torch.ops.lora_kernels.lora_linear_fwd (with its registered autograd)
    give bitwise-identical outputs and gradients."""
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built here")
    x, W, b, A, B = inputs(M=7, K=16, N=12, r=3)
    dy = torch.randn(7, 12)
    results = []
    for registered in (False, True):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(123)
        if registered:
            seed = new_seed() if dropout_p else None
            y = torch.ops.lora_kernels.lora_linear_fwd(xs, W, b, As, Bs, 0.5, dropout_p, seed, backend)[0]
        else:
            y = lk.lora_linear(xs, W, b, As, Bs, 0.5, dropout_p=dropout_p, training=True, backend=backend)
        y.backward(dy)
        results.append((y.detach(), xs.grad, As.grad, Bs.grad))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_frozen_base_weight_requires_grad_is_an_error():
    x, W, b, A, B = inputs()
    with pytest.raises(ValueError, match="weight requires grad, but lora_linear keeps the base layer frozen"):
        lk.lora_linear(x, W.requires_grad_(), b, A, B, 0.5)
    with pytest.raises(ValueError, match="bias requires grad"):
        lk.lora_linear(x, W.detach(), b.requires_grad_(), A, B, 0.5)
    with torch.no_grad():  # no autograd, nothing dropped: fine
        lk.lora_linear(x, W, b, A, B, 0.5)


# ----------------------------------------------------------------------------------------------------
# The persistent cache
# ----------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys, torch
    import lora_kernels as lk
    from lora_kernels import dispatch
    torch.manual_seed(0)
    M, K, N = int(sys.argv[1]), 24, 20
    x, W, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(4, K), torch.randn(N, 4)
    lk.lora_linear(x, W, None, A, B, 0.5)
    print(json.dumps(dispatch.choices()))
""")


def _child(cache_dir, tune_env, M=9):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LORA_KERNELS_CACHE_DIR=str(cache_dir), LORA_KERNELS_TUNE=tune_env, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(M)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_cache_round_trips_across_processes(cache):
    tuned = _result(_child(cache, "1"))
    (key, choice), = tuned.items()
    assert entries(cache)[key]["choice"] == choice
    again = _result(_child(cache, "0"))  # no tuning allowed: the choice must come from the file
    assert again == {key: choice}


def test_two_processes_tuning_at_once_leave_a_valid_file(cache):
    procs = [_child(cache, "1", M) for M in (9, 300)]  # two keys (M buckets 16 and 512)
    keys = set()
    for p in procs:
        keys |= set(_result(p))
    assert set(entries(cache)) == keys and len(keys) == 2


def test_corrupt_and_foreign_cache_files_are_rebuilt(cache, monkeypatch):
    tune(monkeypatch, True)
    path = dispatch.cache_path("cpu")
    x, W, b, A, B = inputs()
    for junk in ("{not json", json.dumps({"format": 1, "environment": {"device": "another GPU"}, "entries": {}})):
        with open(path, "w") as f:
            f.write(junk)
        dispatch.reset()
        with pytest.warns(RuntimeWarning, match="ignoring the (corrupt )?dispatch cache"):
            lk.lora_linear(x, W, b, A, B, 0.5)
        assert len(entries(cache)) == 1  # rebuilt, valid


def test_write_is_atomic(tmp_path, monkeypatch):
    """A failure mid-write leaves the old file whole and no temporary behind."""
    path = tmp_path / "f.json"
    dispatch.write_atomic(str(path), '{"old": 1}')

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        dispatch.write_atomic(str(path), '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_cache_info(cache, monkeypatch):
    tune(monkeypatch, True)
    x, W, b, A, B = inputs()
    lk.lora_linear(x, W, b, A, B, 0.5)
    info = dispatch.cache_info("cpu")
    assert info["exists"] and info["tuning"] and info["path"].startswith(str(cache))
    assert len(info["entries"]) == 1 and info["environment"]["torch"] == torch.__version__


def test_bucket():
    assert [dispatch.bucket(m) for m in (0, 1, 2, 3, 17, 128, 129)] == [0, 1, 2, 4, 32, 128, 256]


# ----------------------------------------------------------------------------------------------------
# python -m lora_kernels tune / info
# ----------------------------------------------------------------------------------------------------

def test_projections_of_a_llama_config():
    from lora_kernels.tune import projections
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    got = {p.name: (p.in_features, p.out_features, p.bias) for p in projections(cfg)}
    assert got == {"q": (4096, 4096, False), "k": (4096, 1024, False), "v": (4096, 1024, False),
                   "o": (4096, 4096, False), "gate": (4096, 14336, False), "up": (4096, 14336, False),
                   "down": (14336, 4096, False)}
    qwen = projections({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                        "num_attention_heads": 14, "num_key_value_heads": 2})
    assert [p.bias for p in qwen] == [True, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="hidden_size"):
        projections({"vocab_size": 3})


def test_tune_command_fills_the_cache_and_info_shows_it(cache, tmp_path, capsys):
    from lora_kernels.__main__ import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                               "num_key_value_heads": 2}))
    assert main(["tune", "--config", str(cfg), "--ranks", "4", "--tokens", "3", "--adapters", "2",
                 "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[:out.rindex("]") + 1])
    # 4 distinct shapes (q/o 32->32, k/v 32->16, gate/up 32->48, down 48->32) x fwd + bwd, + 4 multi_lora fwd
    assert len(rows) == 12 and {r["phase"] for r in rows} == {"lora_linear fwd", "lora_linear bwd",
                                                                 "multi_lora_linear fwd"}
    assert all(r["winner"].split("[")[0] in backends.BACKENDS and r["reference"] == "torch" for r in rows)
    assert len(entries(cache)) == 12
    # Nothing left to measure: a second run reports that; --retune measures again.
    assert main(["tune", "--config", str(cfg), "--ranks", "4", "--tokens", "3", "--no-progress"]) == 0
    assert "nothing new was measured" in capsys.readouterr().out
    info = dispatch.cache_info("cpu")
    assert len(info["entries"]) == 12
