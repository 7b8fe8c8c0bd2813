"""The one timing helper every benchmark uses, plus memory probes and the device's measured peaks.

GPU timing:
  * CUDA events around a sample of k calls, median (and p20 / p80) over many samples;
  * a warm-up first (Triton compiles and autotunes on its first calls);
  * rotating inputs: the caller passes one callable per input set, with enough sets that their combined
    footprint exceeds twice the L2 cache (50 MB on an H100), and samples cycle through them, so a small
    shape cannot run out of a warm L2;
  * `graph=True` captures the k calls into one CUDA graph and times its replays: the launch-free GPU time
    that matters for launch-bound sizes (decode), where eager timing measures the Python / dispatcher
    overhead instead. Eager time then includes that host overhead, which is what an eager user pays.
CPU timing: `time.perf_counter` around samples of k calls, median over samples.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100; read from the device when torch exposes it


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int            # timed samples the statistics are over
    calls_per_sample: int
    mode: str               # "eager" (CUDA events), "graph" (CUDA graph replay) or "cpu" (perf_counter)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotating_sets(footprint_bytes: int, device: torch.device, max_sets: int = 64) -> int:
    """How many copies of the inputs make the working set at least 2x the L2 cache (1 on CPU)."""
    if device.type != "cuda" or footprint_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * l2_bytes(device) / footprint_bytes)))


def _stats(per_call_ms: list[float]) -> tuple[float, float, float]:
    if len(per_call_ms) == 1:
        return per_call_ms[0], per_call_ms[0], per_call_ms[0]
    q = statistics.quantiles(per_call_ms, n=10, method="inclusive")  # deciles
    return statistics.median(per_call_ms), q[1], q[7]


def _plan(est_ms: float, n_sets: int, min_sample_ms: float, budget_ms: float, min_samples: int,
          max_calls: int) -> tuple[int, int]:
    """(calls per sample, samples): a sample long enough to time, as many samples as the budget allows."""
    est_ms = max(est_ms, 1e-4)
    k = max(n_sets, math.ceil(min_sample_ms / est_ms))
    k = min(k, max(max_calls, n_sets))
    samples = int(budget_ms / (k * est_ms))
    return k, max(min_samples, min(samples, 200))


def benchmark(calls: Sequence[Callable[[], Any]], device: torch.device, *, graph: bool = False,
              budget_ms: float = 200.0, warmup_ms: float = 25.0, min_samples: int = 10) -> Timing:
    """Time one call per input set in `calls`, cycling through the sets. Returns per-call statistics.

    Raises whatever the calls raise (and, with `graph=True`, whatever stream capture raises) so the caller
    can report the contender as not available.
    """
    if not calls:
        raise ValueError("calls must hold at least one callable")
    device = torch.device(device)
    if device.type != "cuda":
        return _benchmark_cpu(calls, budget_ms, min_samples)
    n = len(calls)

    # Warm-up: compile / autotune / allocator, then run for about warmup_ms and estimate one call.
    for c in calls:
        c()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(max(n, 3)):
        calls[i % n]()
    end.record()
    sync(device)
    est = start.elapsed_time(end) / max(n, 3)
    for i in range(min(1000, int(warmup_ms / max(est, 1e-3)))):
        calls[i % n]()

    if graph:
        return _benchmark_graph(calls, device, est, budget_ms, min_samples)

    k, samples = _plan(est, n, min_sample_ms=0.5, budget_ms=budget_ms, min_samples=min_samples,
                       max_calls=1000)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(samples)]
    j = 0
    for s, e in events:
        s.record()
        for _ in range(k):
            calls[j % n]()
            j += 1
        e.record()
    sync(device)
    med, p20, p80 = _stats([s.elapsed_time(e) / k for s, e in events])
    return Timing(med, p20, p80, samples, k, "eager")


def _benchmark_graph(calls, device, est_ms, budget_ms, min_samples) -> Timing:
    n = len(calls)
    k, samples = _plan(est_ms, n, min_sample_ms=0.2, budget_ms=budget_ms, min_samples=min_samples,
                       max_calls=200)
    # Capture needs a side stream that has already run the calls (lazy init, workspaces, autotuning).
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(k):
            calls[j % n]()
    g.replay()
    sync(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(samples)]
    for s, e in events:
        s.record()
        g.replay()
        e.record()
    sync(device)
    med, p20, p80 = _stats([s.elapsed_time(e) / k for s, e in events])
    del g
    return Timing(med, p20, p80, samples, k, "graph")


def _benchmark_cpu(calls, budget_ms, min_samples) -> Timing:
    n = len(calls)
    for c in calls:
        c()
    t0 = time.perf_counter()
    calls[0]()
    est = (time.perf_counter() - t0) * 1e3
    k, samples = _plan(est, n, min_sample_ms=1.0, budget_ms=budget_ms, min_samples=min(min_samples, 5),
                       max_calls=1000)
    per_call, j = [], 0
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(k):
            calls[j % n]()
            j += 1
        per_call.append((time.perf_counter() - t0) * 1e3 / k)
    med, p20, p80 = _stats(per_call)
    return Timing(med, p20, p80, samples, k, "cpu")


# ------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------

def saved_for_backward_bytes(forward: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `forward()`, not counting the
    storages of `exclude` (inputs and parameters, which exist anyway). Works on every device."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip and ptr != 0:
                seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values())


def peak_memory_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA memory allocated by a second `step()` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    del_me = step()  # first call: compilation, autotuning and workspaces are not the op's memory
    del del_me
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


# ------------------------------------------------------------------------------------------------------
# Measured peaks: what "% of peak" is relative to
# ------------------------------------------------------------------------------------------------------

def measure_peaks(device: torch.device, dtype: torch.dtype) -> dict:
    """Achievable peak FLOP/s (a large matmul in `dtype`) and bytes/s (a large device-to-device copy).

    On a GPU: an 8192^3 matmul and a 1 GiB copy (read + write = 2 GiB moved); on a CPU smaller sizes,
    since only the order of magnitude matters there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n, copy_bytes, budget = 8192, 2**30, 300.0
    else:
        n, copy_bytes, budget = 1024, 64 * 2**20, 100.0
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t_mm = benchmark([lambda: torch.mm(a, b, out=c)], device, budget_ms=budget, min_samples=5)
    del a, b, c
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t_cp = benchmark([lambda: dst.copy_(src)], device, budget_ms=budget, min_samples=5)
    del src, dst
    # The fast tail (p20), not the median: a peak is the best the device sustains.
    return {
        "matmul_flops": 2.0 * n ** 3 / (t_mm.p20_ms * 1e-3),
        "copy_bytes_per_s": 2.0 * copy_bytes / (t_cp.p20_ms * 1e-3),
        "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul",
        "copy": f"{copy_bytes // 2**20} MiB device copy (read + write)",
    }
