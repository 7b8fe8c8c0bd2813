"""Every Triton kernel config the package can launch compiles for sm_80 and sm_90 on this CPU-only
machine, without register spills and within the GPU's shared memory (lora_kernels/kernels/aot_check.py)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the AOT check compiles Triton kernels")


def test_all_kernel_configs_compile_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.kernels.aot_check", "--json"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=root)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernel was compiled:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {r["cc"] for r in rows} == {80, 90}
    for r in rows:  # the table shows in the log with -rA / on failure
        print(f"sm_{r['cc']} {r['kernel']} regs={r.get('registers')} stack={r.get('stack')} "
              f"smem={r.get('shared')} {r['error']}")
    failed = [f"sm_{r['cc']} {r['kernel']} {r['signature']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
