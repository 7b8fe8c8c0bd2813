"""pytest-benchmark suite for `lora_linear`: `pytest bench/test_bench_lora_linear.py` (or `pytest bench/`).

The headline cases on a GPU (small CPU cases otherwise), every contender of bench_lora_linear, forward and
forward + backward. pytest-benchmark times wall clock around a synchronised call; `python -m bench` is the
reference measurement (CUDA events, rotating buffers, CUDA graphs, roofline).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from lora_kernels.bench import bench_lora_linear as bl  # noqa: E402
from lora_kernels.bench.common import Context  # noqa: E402
from lora_kernels.bench.roofline import base_gemm_work, lora_linear_work  # noqa: E402
from lora_kernels.bench.timing import sync  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [bl.make_case(*c) for c in (bl.HEADLINE if DEVICE.type == "cuda" else bl.CPU_CASES[:3])]


@pytest.mark.parametrize("contender", bl.CONTENDERS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.proj}-r{c.r}-M{c.M}")
def test_lora_linear(benchmark, case, phase, contender):
    reason = bl.contender_unavailable(contender, DEVICE)
    if reason:
        pytest.skip(reason)
    ctx = Context(DEVICE, DTYPE, torch.float32)
    inp = bl.make_inputs(case, ctx)
    bwd = phase == "fwd+bwd"
    fwd, params = bl.build(contender, inp, 0.0, training=bwd)
    call = bl._step_call(fwd, inp.x, params, inp.g) if bwd else bl._fwd_call(fwd)

    def run():
        call()
        sync(DEVICE)

    benchmark.group = f"{case.model} {case.proj} {case.K}->{case.N} r={case.r} M={case.M} {phase}"
    benchmark.pedantic(run, warmup_rounds=3, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1)
    e, a = inp.x.element_size(), inp.A.element_size()
    work = (base_gemm_work(case.M, case.K, case.N, e, case.bias, bwd) if contender == "base"
            else lora_linear_work(case.M, case.K, case.N, case.r, e, a, case.bias, bwd))
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=work.flops / med / 1e12, gbps=work.bytes / med / 1e9,
                                device=str(DEVICE), dtype=str(DTYPE))
