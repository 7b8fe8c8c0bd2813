"""Static GPU evidence on this CPU-only machine (lora_kernels/kernels/aot_check.py, static_report.py).

* test_static_report_thresholds: the static report of the CI subset of the headline cases (compiled for
  sm_80 and sm_90, ~90 compiles: about 3 minutes on 2 cores with a cold Triton cache) holds the thresholds
  below.
* test_all_kernel_configs_compile_for_sm80_sm90 (slow: ~500 compiles, 15+ minutes cold): every config
  the launchers can pick compiles without spills and within shared memory. Opt in with
  LORA_KERNELS_AOT_ALL=1 (or run `python -m lora_kernels.kernels.aot_check`).
* test_aot_check_on_triton_range (slow, network): the same under both ends of the Triton range declared in
  pyproject.toml (scripts/aot_check_triton.sh). Opt in with LORA_KERNELS_AOT_TRITON_RANGE=1.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the AOT check compiles Triton kernels")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Thresholds of the report (each row is one kernel of one case on one GPU).
MAX_SPILL_BYTES = 0              # a spill is a local-memory round trip inside the main loop: none allowed
ALLOWED_ATOMICS = {"atom.relaxed", "red.relaxed"}  # no kernel reads back what it adds: no acq_rel fences
GPU_FENCE = re.compile(r"MEMBAR\.\w+\.(GPU|SYS)")  # acq_rel atomics compile to MEMBAR.ALL.GPU around them
GEMM_KERNELS = ("_gemm_lora_kernel", "_multi_lora_gemm_kernel", "_qlora_gemm_kernel", "_dora_gemm_kernel",
                "_dora_dx_kernel")
FILL_MIN_M, FILL_MIN_N = 16, 1024  # GEMMs at least this big ...
MIN_GEMM_CTAS = 132              # ... have a CTA for every SM of an H100 (132 SMs)
MIN_MULTI_GEMM_CTAS_PER_SM = 2   # two resident CTAs per SM on sm_90 hide the epilogue of one behind the other
HGMMA_MIN_BLOCK_M = 64           # wgmma works on 64-row warpgroup tiles: bf16 GEMM tiles this tall must use it


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.kernels.aot_check", "--report", str(path),
                           "--subset", "ci"], env=_env(), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert path.exists(), f"no report written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(path.read_text())
    failed = [f"sm_{r['cc']} {r['config']} ({r['case']}): {r['error']}" for r in rep["rows"] if "error" in r]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rep


def _block_m(row) -> int:
    return int(re.search(r"BLOCK_M=(\d+)", row["config"]).group(1))


def _gemm_rows(report, kernel=GEMM_KERNELS):
    return [r for r in report["rows"] if r["kernel"] in kernel]


def test_report_covers_both_families_and_gpus(report):
    assert not report["missing"], report["missing"]
    assert {r["cc"] for r in report["rows"]} == {80, 90}
    cases = {r["case"].split()[0] for r in report["rows"]}
    assert {"lora_linear", "multi_lora_linear[fused]", "qlora_linear", "dora_linear"} <= cases, cases
    for r in report["rows"]:  # the table shows in the log with -rA / on failure
        print(f"sm_{r['cc']} {r['case']} {r['config']} grid={r['grid_ctas']} regs={r['regs']} "
              f"spill={r['spill_bytes']} smem={r['smem_bytes']} ctas/SM={r['ctas_per_sm']} waves={r['waves']} "
              f"mma={r['mma']} atomics={r['atomics']}")


def test_no_spills_and_every_kernel_fits(report):
    bad = [(r["config"], r["cc"], r["spill_bytes"]) for r in report["rows"] if r["spill_bytes"] > MAX_SPILL_BYTES]
    assert not bad, bad
    assert all(r["ctas_per_sm"] >= 1 for r in report["rows"])


def test_atomics_are_relaxed_without_gpu_fences(report):
    bad = [(r["config"], r["cc"], r["atomics"]) for r in report["rows"] if set(r["atomics"]) - ALLOWED_ATOMICS]
    assert not bad, bad
    fenced = [(r["config"], r["cc"], r["fences"]) for r in report["rows"]
              if any(GPU_FENCE.match(f) for f in r["fences"])]
    assert not fenced, fenced
    assert any(r["atomics"] for r in report["rows"]), "no atomics at all: the check above would be vacuous"


def test_gemms_fill_an_h100(report):
    rows = [r for r in _gemm_rows(report) if r["cc"] == 90
            and r["dims"].get("M", r["dims"].get("T", 0)) >= FILL_MIN_M and r["dims"]["N"] >= FILL_MIN_N]
    assert rows
    bad = [(r["case"], r["config"], r["grid_ctas"]) for r in rows if r["grid_ctas"] < MIN_GEMM_CTAS]
    assert not bad, bad


def test_bf16_gemms_use_hgmma_on_sm90(report):
    rows = [r for r in _gemm_rows(report) if r["cc"] == 90 and "CT=bf16" in r["config"]
            and _block_m(r) >= HGMMA_MIN_BLOCK_M]
    assert rows
    bad = [(r["case"], r["config"], r["mma"]) for r in rows if r["mma"]["HGMMA"] == 0]
    assert not bad, bad


def test_multi_lora_gemm_two_ctas_per_sm_on_sm90(report):
    rows = [r for r in _gemm_rows(report, ("_multi_lora_gemm_kernel",)) if r["cc"] == 90]
    assert rows
    bad = [(r["case"], r["config"], r["regs"], r["ctas_per_sm"]) for r in rows
           if r["ctas_per_sm"] < MIN_MULTI_GEMM_CTAS_PER_SM]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_KERNELS_AOT_ALL") != "1",
                    reason="~500 compiles (15+ min with a cold cache): set LORA_KERNELS_AOT_ALL=1")
def test_all_kernel_configs_compile_for_sm80_sm90():
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.kernels.aot_check", "--json"], env=_env(),
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernel was compiled:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {r["cc"] for r in rows} == {80, 90}
    failed = [f"sm_{r['cc']} {r['kernel']} {r['signature']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_KERNELS_AOT_TRITON_RANGE") != "1",
                    reason="installs other Tritons (network) and compiles everything twice: "
                           "set LORA_KERNELS_AOT_TRITON_RANGE=1")
def test_aot_check_on_triton_range():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "aot_check_triton.sh")], env=_env(),
                          capture_output=True, text=True, timeout=7200, cwd=ROOT)
    versions = re.findall(r"== triton (\S+)", proc.stderr)
    assert len(versions) == 2, proc.stderr[-3000:]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
