"""A `patch_peft`-ed tiny Llama trained by 2 processes (gloo, CPU, loopback only) under DDP and FSDP2.

tests/dist_worker.py runs both modes in one launch (imports dominate the cost) and the single-process
reference on the whole batch; here we check: the fused op ran (profiler counts), first-step LoRA gradients
and the LoRA parameters after 3 SGD steps equal the single-process run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft", reason="the distributed tests patch a PEFT model: pip install 'lora_kernels[peft]'")
pytest.importorskip("transformers", reason="the distributed tests build a transformers LlamaForCausalLM")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # one launch: 3 interpreters importing torch + transformers + peft on 2 shared cores
MODES = ("ddp", "fsdp2")
N_LORA_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result.pt"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    cmd = [sys.executable, os.path.join(ROOT, "tests", "dist_worker.py"), "--out", str(out),
           "--modes", ",".join(MODES)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"distributed worker did not finish in {TIMEOUT_S} s; output:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out)


@pytest.mark.parametrize("mode", MODES)
def test_two_process_training_matches_single_process(results, mode):
    res, ref = results[mode], results["single"]
    assert "error" not in res, f"{mode} failed on 2 gloo ranks:\n{res['error']}"
    # The wrapped model really ran the fused op (no silent fallback to PEFT's forward).
    assert res["fused_calls"] == {"lora_linear_fwd": N_LORA_LAYERS, "lora_linear_bwd": N_LORA_LAYERS}
    assert ref["fused_calls"] == res["fused_calls"]
    assert set(res["grads"]) == set(ref["grads"]) and len(ref["grads"]) == 2 * N_LORA_LAYERS
    for name, g in ref["grads"].items():
        assert torch.count_nonzero(g) > 0, f"{name}: reference gradient is zero, the test could not fail"
        torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{mode} grad {name}: {m}")
    for name, p in ref["params"].items():
        torch.testing.assert_close(res["params"][name], p, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{mode} param {name}: {m}")
    torch.testing.assert_close(res["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]
