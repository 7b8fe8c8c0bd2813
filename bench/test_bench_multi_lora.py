"""pytest-benchmark suite for multi-adapter serving: `pytest bench/test_bench_multi_lora.py`.

The headline serving cases on a GPU (small CPU cases otherwise), every contender of bench_multi_lora.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

from lora_kernels.bench import bench_multi_lora as bm  # noqa: E402
from lora_kernels.bench.common import Context  # noqa: E402
from lora_kernels.bench.roofline import base_only_work, multi_lora_work  # noqa: E402
from lora_kernels.bench.timing import sync  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = bm.default_cases(DEVICE, quick=True)


@pytest.mark.parametrize("contender", bm.CONTENDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.proj}-r{c.r}-{c.phase}-T{c.T}-d{c.d}")
def test_multi_lora(benchmark, case, contender):
    reason = bm.contender_unavailable(contender, DEVICE)
    if reason:
        pytest.skip(reason)
    ctx = Context(DEVICE, DTYPE, DTYPE)
    inp = bm.make_inputs(case, ctx)
    fwd, _ = bm.build(contender, inp)

    def run():
        with torch.no_grad():
            fwd()
        sync(DEVICE)

    benchmark.group = case.label
    benchmark.pedantic(run, warmup_rounds=3, rounds=20 if DEVICE.type == "cuda" else 5, iterations=1)
    e = inp.x.element_size()
    work = (base_only_work(case.T, case.K, case.N, e, case.bias) if contender == "base"
            else multi_lora_work(case.T, case.K, case.N, case.r, case.d, e, e, case.bias))
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=work.flops / med / 1e12, gbps=work.bytes / med / 1e9)
