"""Smoke tests of the benchmark CLI (`python -m bench`) on tiny CPU shapes: it produces the table, the JSON
and the PNG, reports unavailable or failing contenders as rows instead of crashing, and flags a contender
whose output is wrong. Also checks the FLOP / byte formulas on hand-countable shapes. No timing asserts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import __main__ as cli
from bench import bench_lora_linear as bl
from bench.report import add_ratios
from bench.roofline import Work, base_gemm_work, lora_linear_work, multi_lora_work
from bench.timing import benchmark, saved_for_backward_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--shape", "40x24", "--ranks", "3", "--tokens", "1,7", "--adapters", "1,3",
        "--decode-seqs", "5", "--prefill-seqs", "4", "--prefill-len", "3", "--budget-ms", "1",
        "--no-progress", "--no-peaks"]


def _rows(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def test_cli_tiny_run_writes_table_json_png(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-peaks"]  # measure the (CPU) peaks once here
    rc = cli.main(args + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for title in ("lora_linear - fwd", "lora_linear - fwd+bwd", "lora_linear - memory",
                  "multi_lora - decode", "multi_lora - prefill"):
        assert title in out
    assert "GPU figures" in out and "need a GPU" in out

    data = _rows(tmp_path)
    assert data["machine"]["torch"] == torch.__version__
    assert data["peaks"]["matmul_flops"] > 0 and data["peaks"]["copy_bytes_per_s"] > 0
    assert {"date", "commit", "triton", "device"} <= set(data["machine"])
    rows = data["rows"]
    by = {(r["suite"], r["phase"], r["tokens"], r["contender"], r.get("dropout")): r for r in rows}
    for phase in ("fwd", "fwd+bwd"):
        for M in (1, 7):
            for c in ("base", "peft", "torch-addmm", "ours:torch"):
                r = by[("lora_linear", phase, M, c, 0.0)]
                assert r["status"] == "ok", r
                assert r["ms"] > 0 and r["mode"] == "cpu" and r["flops"] > 0 and r["bytes"] > 0
                assert r["vs_base"] > 0 and r["vs_peft"] > 0 and r["pct_peak"] > 0
                if c != "base" and phase == "fwd":
                    assert r["rel_err"] < 1e-4  # fp32 on CPU
            # Triton is never timed through the interpreter: a row with its reason, not a crash.
            tri = by[("lora_linear", phase, M, "ours:triton", 0.0)]
            assert tri["status"] == "n/a" and "CUDA" in tri["reason"]
    # memory rows only for the largest token count, at both dropouts; PEFT saves its dropped input at p=0.1
    mem = [r for r in rows if r["phase"] == "memory"]
    assert {r["tokens"] for r in mem} == {7} and {r["dropout"] for r in mem} == {0.0, 0.1}
    peft_drop = by[("lora_linear", "memory", 7, "peft", 0.1)]
    assert peft_drop["status"] == "ok" and peft_drop["saved_mb"] * 1e6 >= 7 * 40 * 4
    serve = [r for r in rows if r["suite"] == "multi_lora"]
    assert {(r["phase"], r["adapters"]) for r in serve} == {("decode", 1), ("decode", 3), ("prefill", 1),
                                                          ("prefill", 3)}
    for r in serve:
        assert r["status"] in ("ok", "n/a"), r
        assert r["status"] == "ok" or r["reason"]
        if r["contender"] in ("base", "peft-mixed", "torch-loop"):
            assert r["status"] == "ok", r
    for r in rows:
        if r["status"] == "n/a":
            assert r["reason"]

    png = tmp_path / "speedup.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot is optional: no matplotlib, no PNG, the rest still written
        assert not png.exists()
    md = (tmp_path / "table.md").read_text()
    assert "| case |" in md and "python -m bench" in md


def test_failing_and_wrong_contenders_become_rows(tmp_path, monkeypatch, capsys):
    real_build = bl.build

    def build(name, inp, dropout_p, training):
        if name == "torch-addmm":
            raise RuntimeError("boom")
        fwd, params = real_build(name, inp, dropout_p, training)
        if name == "ours:torch":
            return (lambda: fwd() * 2.0), params  # a wrong answer must not pass as a fast one
        return fwd, params

    monkeypatch.setattr(bl, "build", build)
    rc = cli.main(TINY + ["--suite", "lora_linear", "--tokens", "5", "--phases", "fwd", "--no-plot",
                          "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "WRONG" in captured.out and "disagree" in captured.err
    rows = {r["contender"]: r for r in _rows(tmp_path)["rows"]}
    assert rows["torch-addmm"]["status"] == "n/a" and "boom" in rows["torch-addmm"]["reason"]
    assert rows["ours:torch"]["status"] == "wrong"
    assert rows["peft"]["status"] == "ok"


def test_time_budget_reports_unreached_rows(tmp_path, capsys):
    rc = cli.main(TINY + ["--suite", "lora_linear", "--phases", "fwd", "--no-plot", "--time-budget", "0",
                          "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path)["rows"]
    assert rows and all(r["status"] == "n/a" and "time budget" in r["reason"] for r in rows)


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--quick" in p.stdout and "--suite" in p.stdout


def test_unknown_names_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--models", "gpt5", "--no-peaks"])
    with pytest.raises(SystemExit):
        cli.main(["--suite", "lora_linear", "--contenders", "nope", "--no-peaks", "--device", "cpu"])


def test_work_formulas_by_hand():
    # M=2 tokens, K=3, N=5, r=1, bf16 activations (e=2), fp32 adapters (a=4), no bias
    assert base_gemm_work(2, 3, 5, 2, False, backward=False) == Work(2 * 2 * 5 * 3, 2 * (6 + 15 + 10))
    assert base_gemm_work(2, 3, 5, 2, True, backward=False).bytes == 2 * (6 + 15 + 10 + 5)
    fwd = lora_linear_work(2, 3, 5, 1, 2, 4, False, backward=False)
    assert fwd.flops == 60 + 2 * 2 * 3 * 1 + 2 * 2 * 1 * 5
    assert fwd.bytes == 2 * (6 + 15 + 10) + 4 * (3 + 5)
    both = lora_linear_work(2, 3, 5, 1, 2, 4, False, backward=True)
    assert both.flops == fwd.flops + 60 + 4 * 2 * 5 * 1 + 4 * 2 * 1 * 3
    assert both.bytes == fwd.bytes + 2 * (10 + 15 + 12) + 2 * 4 * (3 + 5)
    serve = multi_lora_work(4, 3, 5, 1, 2, 2, 2, False)
    assert serve.flops == 2 * 4 * 5 * 3 + 2 * 4 * 3 + 2 * 4 * 5
    assert serve.bytes == 2 * (12 + 15 + 20) + 2 * 2 * (3 + 5)
    assert Work(10.0, 4.0).floor_s(5.0, 1.0) == 4.0 and Work(10.0, 4.0).floor_s(1.0, 4.0) == 10.0


def test_timing_helper_and_saved_bytes_on_cpu():
    a = torch.randn(64, 64)
    t = benchmark([lambda: a @ a, lambda: a @ a.T], torch.device("cpu"), budget_ms=5)
    assert t.mode == "cpu" and t.p20_ms <= t.median_ms <= t.p80_ms and t.samples >= 3
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    # x * 2 saves nothing; (x * 2) @ wᵀ saves the [8, 16] float32 product (512 bytes), not x or w
    assert saved_for_backward_bytes(lambda: (x * 2) @ w.T, [x, w]) == 8 * 16 * 4


def test_ratios():
    rows = [dict(suite="s", phase="fwd", model="m", proj="q", r=1, tokens=1, contender=c, ms=ms)
            for c, ms in (("base", 1.0), ("peft", 4.0), ("ours:triton", 2.0))]
    add_ratios(rows)
    ours = rows[2]
    assert ours["vs_base"] == 2.0 and ours["vs_peft"] == 2.0
