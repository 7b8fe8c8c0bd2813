"""`python -m lora_kernels` and the library functions behind it (lora_kernels.diagnostics): info reports what
is installed and why a backend is unavailable; selftest passes on this machine and FAILS (exit 1) when a
backend returns garbage or raises."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import lora_kernels
from lora_kernels import __main__ as cli
from lora_kernels import backends, diagnostics
from lora_kernels.ops import lora_linear as single_ops
from lora_kernels.ops import multi_lora as multi_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------- info

def test_info_reports_versions_backends_and_extension():
    d = diagnostics.info("cpu")
    json.dumps(d, default=str)  # --json must work
    pk = {p["name"]: p for p in d["packages"]}
    assert pk["torch"]["version"] == metadata.version("torch")
    assert d["lora_kernels"]["version"] == lora_kernels.__version__
    b = d["backends"]
    assert b["device"] == "cpu" and "torch" in b["available"]
    assert set(b["available"]) | set(b["unavailable"]) == set(backends.BACKENDS)
    assert not set(b["available"]) & set(b["unavailable"])
    assert all(why for why in b["unavailable"].values())
    assert b["default"] in b["available"]
    e = d["extension"]
    assert e["built"] == (backends.NATIVE is not None)
    assert e["built"] or e["error"]
    text = diagnostics.format_info(d)
    for word in ("torch", "backends on cpu", "extension", "dispatch"):
        assert word in text


def test_info_says_why_native_is_unavailable(monkeypatch):
    monkeypatch.setattr(backends, "NATIVE", None)
    monkeypatch.setattr(backends, "NATIVE_ERROR", "No module named 'lora_kernels._C'")
    monkeypatch.setattr(backends, "_AVAILABLE", {}, raising=False)  # its per-device cache, restored after
    d = diagnostics.info("cpu")
    assert "native" not in d["backends"]["available"]
    assert "lora_kernels._C" in d["backends"]["unavailable"]["native"]
    assert d["extension"] == {"built": False, "error": "No module named 'lora_kernels._C'"}
    assert "not built" in diagnostics.format_info(d)


def test_version_ranges_come_from_the_declared_requirements(monkeypatch):
    declared = ['torch>=99', 'triton>=3.2; platform_system == "Linux" or platform_system != "Linux"',
                'peft>=0.1; extra == "peft"', 'transformers<1; extra == "peft"']
    monkeypatch.setattr(metadata, "requires", lambda name: declared)
    rows = {r["name"]: r for r in diagnostics.package_versions()}
    assert rows["torch"]["required"] == ">=99" and rows["torch"]["in_range"] is False
    assert rows["peft"]["extra"] == "peft"
    if rows["peft"]["version"] is not None:
        assert rows["peft"]["in_range"] is True
    if rows["transformers"]["version"] is not None:
        assert rows["transformers"]["in_range"] is False
    assert rows["packaging"]["required"] is None and rows["packaging"]["in_range"] is None  # not declared here
    assert "OUTSIDE the declared range" in diagnostics.format_info(dict(diagnostics.info("cpu"),
                                                                        packages=list(rows.values())))


def test_dispatch_cache_is_reported_or_said_missing(monkeypatch):
    d = diagnostics.dispatch_info(torch.device("cpu"))
    try:
        from lora_kernels import dispatch  # noqa: F401
        has = hasattr(dispatch, "cache_info")
    except ImportError:
        has = False
    assert (d is not None) == has
    if not has:
        assert "not available" in diagnostics.format_info(diagnostics.info("cpu"))


# --------------------------------------------------------------------------------------------------- selftest

@pytest.fixture
def small_selftest(monkeypatch):
    """One shape with dropout and one dtype pair: every backend (the Triton interpreter too) in seconds."""
    monkeypatch.setattr(diagnostics, "LORA_SHAPES", ((5, 16, 12, 3),))
    monkeypatch.setattr(diagnostics, "_selftest_dtypes", lambda device: [(torch.float32, torch.float32)])


def test_selftest_passes_on_every_available_backend(small_selftest):
    checks = diagnostics.selftest("cpu")
    ran = {c.backend for c in checks}
    assert ran == set(backends.available_backends("cpu"))
    assert {c.op for c in checks} == {"lora_linear fwd+bwd", "multi_lora_linear fwd+bwd", "dora_linear fwd+bwd",
                                      "qlora_linear fwd+bwd"}
    assert any("p=0.1" in c.case for c in checks)  # dropout is checked
    bad = [diagnostics.format_check(c) for c in checks if c.status != "PASS"]
    assert not bad, "\n".join(bad)
    assert all(c.error is not None and c.error <= c.tol for c in checks)


def test_selftest_full_on_the_torch_backend():
    checks = diagnostics.selftest("cpu", backends=["torch"])
    # shapes x dtypes, + dropout, + multi, + DoRA and QLoRA per dtype pair
    assert len(checks) == len(diagnostics.LORA_SHAPES) * 3 + 3 + 2 + 2 * 3
    assert {c.status for c in checks} == {"PASS"}, diagnostics.format_selftest(checks)


def test_selftest_fails_a_backend_that_returns_garbage(monkeypatch, small_selftest):
    real = single_ops.lora_linear

    def broken(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False, backend=None):
        y = real(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training, backend=backend)
        return y * 1.01 if backend == "torch" else y  # 1 % off: far outside fp32's bound

    monkeypatch.setattr(single_ops, "lora_linear", broken)
    out = io.StringIO()
    rc = diagnostics.run_selftest("cpu", out=out)
    text = out.getvalue()
    assert rc == 1
    assert "FAILED" in text
    checks = diagnostics.selftest("cpu")
    for c in checks:
        if c.op.startswith("lora_linear"):
            assert (c.status == "FAIL") == (c.backend == "torch"), diagnostics.format_check(c)


def test_selftest_fails_a_backend_that_raises_or_breaks_multi_lora(monkeypatch, small_selftest):
    real = multi_ops.multi_lora_linear

    def broken(*args, backend=None, **kw):
        if backend == "torch":
            raise RuntimeError("kernel exploded")
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(multi_ops, "multi_lora_linear", broken)
    checks = diagnostics.selftest("cpu", backends=["torch"])
    multi = [c for c in checks if c.op == "multi_lora_linear fwd+bwd"]
    assert multi and all(c.status == "FAIL" and "kernel exploded" in c.detail for c in multi)
    assert all(c.status == "PASS" for c in checks if c.op != "multi_lora_linear fwd+bwd")


@pytest.mark.parametrize("family", ["dora", "qlora"])
def test_selftest_fails_a_wrong_dora_or_qlora_backend(monkeypatch, small_selftest, family):
    """A 1 % error in one backend's DoRA / QLoRA forward fails exactly that backend's row of that op."""
    from lora_kernels.ops import dora, qlora
    impls = (dora.IMPLS if family == "dora" else qlora.IMPLS)
    fwd, bwd = impls["torch"]

    def broken(*args, **kw):
        y, saved = fwd(*args, **kw)
        return y * 1.01, saved

    monkeypatch.setitem(impls, "torch", (broken, bwd))
    checks = diagnostics.selftest("cpu", backends=["torch", "native"] if "native" in
                                  backends.available_backends("cpu") else ["torch"])
    for c in checks:
        assert (c.status == "FAIL") == (c.op == f"{family}_linear fwd+bwd" and c.backend == "torch"), \
            diagnostics.format_check(c)


def test_selftest_names_an_unavailable_backend():
    checks = diagnostics.selftest("cpu", backends=["no-such-backend"])
    assert len(checks) == 1 and checks[0].status == "FAIL" and "not available" in checks[0].detail


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_functions(capsys):
    assert cli.main(["info"]) == 0
    assert "backends on" in capsys.readouterr().out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_kernels"]["version"] == lora_kernels.__version__
    assert cli.main([]) == 2  # no command: the help
    assert "selftest" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--", "--help"])
    assert "--suite" in capsys.readouterr().out


def test_cli_subprocess_selftest():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "lora_kernels", "selftest", "--backends", "torch"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASSED" in p.stdout and "lora_linear fwd+bwd" in p.stdout and "multi_lora_linear" in p.stdout
