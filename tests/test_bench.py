"""Smoke tests of the benchmark (`lora_kernels.bench`, run as `python -m bench` / `python -m lora_kernels bench`) on
tiny CPU shapes: it produces the tables, the JSON and the PNG in a time-stamped folder with `latest` pointing
at it, reports unavailable or failing contenders once instead of crashing, flags a contender whose output is
wrong, and fills the LoRA tax, the torch-loop ratio and the overhead goals. Also checks the FLOP / byte
formulas on hand-countable shapes. No timing asserts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from lora_kernels.bench import __main__ as cli
from lora_kernels.bench import bench_lora_linear as bl
from lora_kernels.bench import bench_multi_lora as bm
from lora_kernels.bench import bench_overhead as bo
from lora_kernels.bench.report import add_ratios, busy_note, plot_panels, plot_title, summary, table_rows
from lora_kernels.bench.roofline import Work, base_gemm_work, lora_linear_work, multi_lora_work
from lora_kernels.bench.timing import benchmark, benchmark_interleaved, measure_peaks, saved_for_backward_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--shape", "40x24", "--ranks", "3", "--tokens", "1,7", "--adapters", "1,3",
        "--decode-seqs", "5", "--prefill-seqs", "4", "--prefill-len", "3", "--budget-ms", "1",
        "--no-progress", "--no-peaks"]
TRITON_REASON = "Triton kernels need a CUDA device"


def _data(out_dir):
    with open(os.path.join(out_dir, "latest", "results.json")) as f:
        return json.load(f)


def test_cli_tiny_run_writes_table_json_png(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-peaks"]  # measure the (CPU) peaks once here
    rc = cli.main(args + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for title in ("lora_linear - fwd", "lora_linear - fwd+bwd", "lora_linear - memory",
                  "multi_lora - decode", "multi_lora - prefill", "overhead - per-call host time"):
        assert title in out
    assert "GPU figures" in out and "need a GPU" in out
    # an unavailable contender is named once under each table, not on every row
    n_tables = sum(out.count(t) for t in ("lora_linear - ", "multi_lora - ", "multi_lora_train - "))
    assert 0 < out.count(TRITON_REASON) <= n_tables
    assert "latest" in out and str(tmp_path) in out  # where the outputs went

    data = _data(tmp_path)
    assert data["machine"]["torch"] == torch.__version__
    assert data["peaks"]["matmul_flops"] > 0 and data["peaks"]["copy_bytes_per_s"] > 0
    assert "best of" in data["peaks"]["matmul"] and "best of" in data["peaks"]["copy"]
    assert {"date", "commit", "triton", "device", "default_backend"} <= set(data["machine"])
    rows = data["rows"]
    by = {(r["suite"], r["phase"], r["tokens"], r["contender"], r.get("dropout")): r for r in rows}
    for phase, p in (("fwd", 0.0), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1)):
        for M in (1, 7):
            for c in ("base", "peft", "torch-addmm", "ours", "ours:torch"):
                r = by[("lora_linear", phase, M, c, p)]
                assert r["status"] == "ok", r
                assert r["ms"] > 0 and r["mode"] == "cpu" and r["flops"] > 0 and r["bytes"] > 0
                assert r["p20_ms"] <= r["ms"] <= r["p80_ms"]
                assert r["vs_base"] > 0 and r["vs_peft"] > 0 and r["pct_peak"] > 0
                if c != "base":  # the LoRA tax: time minus the base layer's, same case and run
                    base = by[("lora_linear", phase, M, "base", p)]
                    assert r["tax_ms"] == pytest.approx(r["ms"] - base["ms"])
                    peft_tax = by[("lora_linear", phase, M, "peft", p)]["tax_ms"]
                    if r["tax_ms"] > 0 and peft_tax > 0:
                        assert r["tax_vs_peft"] == pytest.approx(r["tax_ms"] / peft_tax)
                if c != "base" and phase == "fwd":
                    assert r["rel_err"] < 1e-4  # fp32 on CPU
            # Triton is never timed through the interpreter: a row with its reason, not a crash.
            tri = by[("lora_linear", phase, M, "ours:triton", p)]
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
        if r["status"] == "ok":
            assert r["vs_loop"] > 0 and r["vs_peft"] > 0
    overhead = [r for r in rows if r["suite"] == "overhead"]
    assert {r["phase"] for r in overhead} == set(bo.PHASES)
    assert {r["contender"] for r in overhead} == set(bo.contenders(torch.device("cpu")))
    for r in overhead:
        assert r["status"] == "ok" or (r["contender"] == "MultiLoRALinear" and r["phase"] == "fwd+bwd"), r
    assert "Host overhead goals" in out and ("met" in out)
    for r in rows:
        if r["status"] == "n/a":
            assert r["reason"]

    run_dir = os.path.realpath(tmp_path / "latest")
    png = os.path.join(run_dir, "speedup.png")
    if importlib.util.find_spec("matplotlib") is not None:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:  # the plot is optional: no matplotlib, no PNG, the rest still written
        assert not os.path.exists(png)
    with open(os.path.join(run_dir, "table.md")) as f:
        md = f.read()
    assert "| case |" in md and "python -m lora_kernels.bench" in md and "Summary" in md


def test_runs_are_kept_and_latest_is_the_newest(tmp_path):
    args = TINY + ["--suite", "lora_linear", "--tokens", "2", "--phases", "fwd", "--no-plot", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    first = os.path.realpath(tmp_path / "latest")
    assert cli.main(args) == 0
    second = os.path.realpath(tmp_path / "latest")
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == os.path.realpath(tmp_path)
    for d in (first, second):
        assert os.path.exists(os.path.join(d, "results.json")) and os.path.exists(os.path.join(d, "table.txt"))


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
    assert "boom" in captured.out  # said in a footnote under the table
    rows = {r["contender"]: r for r in _data(tmp_path)["rows"]}
    assert rows["torch-addmm"]["status"] == "n/a" and "boom" in rows["torch-addmm"]["reason"]
    assert rows["ours:torch"]["status"] == "wrong"
    assert rows["peft"]["status"] == "ok"


def test_time_budget_reports_unreached_rows(tmp_path, capsys):
    rc = cli.main(TINY + ["--suite", "lora_linear", "--phases", "fwd", "--no-plot", "--time-budget", "0",
                          "--out", str(tmp_path)])
    assert rc == 0
    rows = _data(tmp_path)["rows"]
    assert rows and all(r["status"] == "n/a" and "time budget" in r["reason"] for r in rows)


@pytest.mark.parametrize("module", ["bench", "lora_kernels.bench"])
def test_module_entry_points_help(module):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--quick" in p.stdout and "--suite" in p.stdout and "overhead" in p.stdout


def test_unknown_names_are_rejected(capsys):
    with pytest.raises(SystemExit, match=r"unknown model \['gpt5'\]; choose from .*llama3-8b"):
        cli.main(["--models", "gpt5", "--no-peaks"])
    with pytest.raises(SystemExit, match=r"unknown lora_linear contender \['nope'\]; choose from .*'ours'"):
        cli.main(["--suite", "lora_linear", "--contenders", "nope", "--no-peaks", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"--dropouts must lie in \[0, 1\), got \[1\.5\]"):
        cli.main(["--dropouts", "1.5", "--no-peaks", "--device", "cpu"])


def test_quick_runs_the_headline_cases_on_every_device():
    cpu = torch.device("cpu")
    quick, full = bl.default_cases(cpu, quick=True), bl.default_cases(cpu, quick=False)
    assert quick == [bl.make_case(*c) for c in bl.CPU_HEADLINE] and quick != full
    assert bl.make_case("qwen2-0.5b", "gate", 16, 128) in full  # Qwen2-0.5B's gate (896 -> 4864) at M=128
    assert len(bm.default_cases(cpu, quick=True)) < len(bm.default_cases(cpu, quick=False))


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


def test_timing_helpers_on_cpu():
    a = torch.randn(64, 64)
    t = benchmark([lambda: a @ a, lambda: a @ a.T], torch.device("cpu"), budget_ms=5)
    assert t.mode == "cpu" and t.p20_ms <= t.median_ms <= t.p80_ms and t.samples >= 3

    def boom():
        raise RuntimeError("no")
    out = benchmark_interleaved({"mm": [lambda: a @ a], "bad": [boom]}, budget_ms=5, min_rounds=3)
    assert isinstance(out["bad"], RuntimeError) and out["mm"].samples >= 3 and out["mm"].median_ms > 0
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    # x * 2 saves nothing; (x * 2) @ wᵀ saves the [8, 16] float32 product (512 bytes), not x or w
    assert saved_for_backward_bytes(lambda: (x * 2) @ w.T, [x, w]) == 8 * 16 * 4


def test_peaks_are_the_best_over_sizes(monkeypatch):
    from lora_kernels.bench import timing

    seen = {}
    real = timing.benchmark_interleaved

    def spy(calls, **kw):
        out = real(calls, **dict(kw, budget_ms=1, min_rounds=2))
        seen.update(out)
        return out
    monkeypatch.setattr(timing, "benchmark_interleaved", spy)
    p = measure_peaks(torch.device("cpu"), torch.float32)
    kinds = {k[0] for k in seen}
    assert kinds == {"mm", "copy", "read"} and len(seen) >= 9  # several sizes of each, not one
    best_mm = max(2.0 * n ** 3 / (t.best_ms * 1e-3) for (kind, n), t in seen.items() if kind == "mm")
    assert p["matmul_flops"] == best_mm
    for t in seen.values():
        assert t.best_ms <= t.p20_ms <= t.median_ms
    assert p["copy_bytes_per_s"] >= max(2.0 * b / (t.best_ms * 1e-3) for (kind, b), t in seen.items() if kind == "copy")


def _row(contender, ms, **kw):
    return dict(dict(suite="lora_linear", phase="fwd", model="m", proj="q", **{"in": 8, "out": 4}, r=1, tokens=1,
                     dropout=0.0, status="ok", reason=""), contender=contender, ms=ms, **kw)


def test_ratios_and_tax():
    rows = [_row(c, ms) for c, ms in (("base", 1.0), ("peft", 4.0), ("ours:triton", 2.0))]
    add_ratios(rows)
    ours = rows[2]
    assert ours["vs_base"] == 2.0 and ours["vs_peft"] == 2.0
    assert ours["tax_ms"] == 1.0 and rows[1]["tax_ms"] == 3.0 and ours["tax_vs_peft"] == pytest.approx(1 / 3)
    assert "tax_ms" not in rows[0]
    serve = [dict(_row(c, ms), suite="multi_lora", phase="decode", adapters=2)
             for c, ms in (("base", 1.0), ("peft-mixed", 6.0), ("torch-loop", 3.0), ("ours", 1.5))]
    add_ratios(serve)
    assert serve[3]["vs_loop"] == 2.0 and serve[3]["vs_peft"] == 4.0 and "tax_ms" not in serve[3]
    assert any("speed-up over torch loop  2.00x" in ln for ln in summary(serve))


def test_unavailable_contenders_are_named_once_under_the_table():
    why = "Triton kernels need a CUDA device"
    rows = []
    for M in (1, 2):
        rows += [_row("base", 1.0, tokens=M), _row("peft", 2.0, tokens=M),
                 dict(_row("ours:triton", None, tokens=M), status="n/a", reason=why)]
        rows.append(_row("ours:native", 1.5, tokens=M) if M == 1 else
                    dict(_row("ours:native", None, tokens=M), status="n/a", reason="error: RuntimeError: x"))
    (t,) = table_rows(rows)
    assert [row[1] for row in t.cells] == ["base", "peft", "ours:native"] * 2  # the never-run one is omitted
    assert sum(why in n for n in t.notes) == 1
    assert t.cells[-1][-1] == "n/a [1]" and any(n.startswith("[1] error: RuntimeError") for n in t.notes)


def test_plot_never_mixes_shapes_and_says_what_was_timed():
    rows = []
    for proj, K, N in (("q", 896, 896), ("down", 4864, 896)):
        for M in (1, 32):
            for c, ms in (("base", 1.0), ("peft", 3.0), ("ours", 2.0)):
                rows.append(dict(_row(c, ms), proj=proj, tokens=M, **{"in": K, "out": N}))
    add_ratios(rows)
    (fig_row,) = plot_panels(rows)
    assert len(fig_row) == 2
    for panel in fig_row:
        assert len({(r["in"], r["out"], r["proj"]) for r in panel["rows"]}) == 1
    meta = {"machine": {"cpu": "X", "cpu_threads": 2, "torch": "t", "triton": "3", "peft": "p", "commit": "c",
                        "date": "d", "backends": ["torch", "native"]}, "settings": {"dtype": "fp32"}}
    title = plot_title(meta)
    assert "CPU timings" in title and "Triton kernels not timed" in title


def test_overhead_goals():
    rows = [dict(suite="overhead", phase=ph, contender=c, ms=us * 1e-3)
            for ph, us_by in (("no-grad", {"peft": 30, "lk.lora_linear": 14, "lk.LoRALinear": 18, "patched peft": 16}),
                              ("fwd+bwd", {"peft": 100, "lk.lora_linear": 95, "lk.LoRALinear": 96,
                                           "patched peft": 97}))
            for c, us in us_by.items()]
    got = {g["goal"]: g for g in bo.goals(rows)}
    assert got["lk.lora_linear no-grad <= 0.5x PEFT"]["met"] is True
    assert got["lk.lora_linear fwd+bwd <= 0.9x PEFT"]["met"] is False
    assert got["lk.LoRALinear adds <= 3 us over lk.lora_linear (no-grad)"]["met"] is False  # +4 us
    assert got["patched peft adds <= 3 us over lk.lora_linear (no-grad)"]["value"] == pytest.approx(2.0)
    assert all(("NOT met" in ln) != ("  met" in ln) for ln in bo.goal_lines(rows))


def test_busy_machine_note():
    assert busy_note({"load_average": 1.5, "cpu_cores": 2, "cpu_threads": 2}) is None
    note = busy_note({"load_average": 6.5, "cpu_cores": 2, "cpu_threads": 2})
    assert "busy" in note and "--threads 1" in note
    assert "--threads 1" not in busy_note({"load_average": 6.5, "cpu_cores": 2, "cpu_threads": 1})
    assert busy_note({"load_average": None, "cpu_cores": 2, "cpu_threads": 2}) is None
    assert "timing with 1 thread" in busy_note({"load_average": 6.5, "cpu_cores": 2, "cpu_threads": 1},
                                               auto_threads=True)


@pytest.mark.parametrize("busy", [True, False])
def test_a_busy_cpu_is_timed_with_one_thread(tmp_path, monkeypatch, capsys, busy):
    from lora_kernels.bench import report

    monkeypatch.setattr(report, "load_average", lambda: 100.0 if busy else 0.0)
    threads = torch.get_num_threads()
    args = TINY + ["--suite", "lora_linear", "--tokens", "2", "--phases", "fwd", "--no-plot", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert torch.get_num_threads() == threads  # restored
    used = _data(tmp_path)["machine"]["cpu_threads"]
    assert used == (1 if busy else threads)
    assert ("timing with 1 thread" in capsys.readouterr().out) == (busy and threads > 1)
    assert cli.main(args + ["--threads", "2"]) == 0  # an explicit choice wins
    assert _data(tmp_path)["machine"]["cpu_threads"] == 2


def test_qlora_suite_runs_on_tiny_shapes():
    """The qlora suite (bench_qlora) on tiny shapes: every contender timed in each row, ratios against PEFT + bnb,
    the floor of the fwd+bwd row, the base path named, the goals printed (met or not: no timing asserts)."""
    pytest.importorskip("bitsandbytes", reason="the qlora suite needs bitsandbytes: pip install 'lora_kernels[qlora]'")
    pytest.importorskip("peft", reason="the qlora suite needs peft")
    from lora_kernels.bench import bench_qlora as bq
    from lora_kernels.bench.common import Context
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, adapter_dtype=torch.float32, budget_ms=1)
    rows = bq.run(ctx, tiny=True)
    assert {(r["phase"], r["tokens"]) for r in rows} == {(p, t) for p, t, *_ in bq.cases(tiny=True)}
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["base_path"] for r in rows), [r for r in rows if
                                                                                       r["status"] != "ok"]
    ours = [r for r in rows if r["contender"] == bq.OURS]
    assert all("vs_peft" in r and "lora_side" in r for r in ours)
    assert "floor_ms" in [r for r in ours if r["phase"] == "fwd+bwd"][0]
    assert "fused dequant-GEMV" in [r for r in ours if r["tokens"] == 1][0]["base_path"]
    assert len(bq.goal_lines(rows)) == len(bq.GOALS) and "ours" in bq.table(rows)


def test_dora_suite_runs_on_tiny_shapes():
    """The dora suite (bench_dora) on tiny shapes: every contender timed in each row, the W0 Aᵀ product in the
    fwd+bwd rows, ours_dora's ratios against PEFT's DoRA and against the floor, goal lines printed (no timing
    asserts)."""
    pytest.importorskip("peft", reason="the dora suite needs peft")
    from lora_kernels.bench import bench_dora as bd
    from lora_kernels.bench.common import Context
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, adapter_dtype=torch.float32, budget_ms=1)
    rows = bd.run(ctx, tiny=True)
    assert {(r["phase"], r["tokens"]) for r in rows} == {(c[4], c[3]) for c in bd.cases(tiny=True)}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert {r["contender"] for r in rows if r["phase"] == "fwd+bwd"} == set(bd.CONTENDERS) | {bd.W0AT}
    ours = [r for r in rows if r["contender"] == "ours_dora"]
    assert all("vs_peft" in r and "floor_ms" in r and "vs_floor" in r for r in ours)
    assert len(bd.goal_lines(rows)) == len(ours) and "ours_dora" in bd.table(rows)
    assert bd.SUITE in cli.SUITES
