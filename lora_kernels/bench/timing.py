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
CPU timing: `time.perf_counter` around samples of k calls, median over samples. The contenders of one
case are timed together in interleaved rounds (`benchmark_interleaved`): a CPU shared with other work
slows them alike, so their ratios stay meaningful where back-to-back runs would not be.
"""
from __future__ import annotations

import math
import random
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
    best_ms: float = math.nan  # the fastest sample (per call): the rate sustained when nothing interfered

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
    per_call = [s.elapsed_time(e) / k for s, e in events]
    med, p20, p80 = _stats(per_call)
    return Timing(med, p20, p80, samples, k, "eager", min(per_call))


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
    per_call = [s.elapsed_time(e) / k for s, e in events]
    med, p20, p80 = _stats(per_call)
    del g
    return Timing(med, p20, p80, samples, k, "graph", min(per_call))


def _benchmark_cpu(calls, budget_ms, min_samples) -> Timing:
    out = benchmark_interleaved({"_": calls}, budget_ms=budget_ms, min_rounds=min(min_samples, 5))["_"]
    if isinstance(out, Exception):
        raise out
    return out


def _estimate_ms(calls: Sequence[Callable[[], Any]], sync_fn: Callable[[], None]) -> float:
    """Warm every input set up, then the fastest of three timed calls (ms)."""
    for c in calls:
        c()
    sync_fn()
    best = math.inf
    for i in range(3):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        sync_fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def benchmark_interleaved(calls: dict[str, Sequence[Callable[[], Any]]], *, budget_ms: float = 200.0,
                          min_sample_ms: float = 1.0, min_rounds: int = 7, max_rounds: int = 200,
                          sync_fn: Callable[[], None] = lambda: None, seed: int = 0
                          ) -> dict[str, Timing | Exception]:
    """Wall-clock timing of several contenders in interleaved rounds: {name: Timing, or the exception it raised}.

    Each contender gets samples of k calls (k such that a sample lasts >= `min_sample_ms`, cycling through its
    input sets); every round takes one sample of each contender in a shuffled order, so load from other
    processes lands on all of them alike. About `budget_ms` of samples per contender (at least `min_rounds`
    rounds). `sync_fn` runs after each sample (e.g. torch.cuda.synchronize for host-overhead timing).
    """
    out: dict[str, Timing | Exception] = {}
    plan: dict[str, tuple[int, float]] = {}
    for name, cs in calls.items():
        if not cs:
            raise ValueError(f"{name}: calls must hold at least one callable")
        try:
            est = max(_estimate_ms(cs, sync_fn), 1e-4)
        except Exception as e:  # noqa: BLE001 - reported per contender by the caller
            out[name] = e
            continue
        k = max(len(cs), min(1000, math.ceil(min_sample_ms / est)))
        plan[name] = (k, est)
    if not plan:
        return out
    mean_sample = statistics.mean(k * est for k, est in plan.values())
    rounds = max(min_rounds, min(max_rounds, int(budget_ms / mean_sample)))
    per_call: dict[str, list[float]] = {n: [] for n in plan}
    pos = dict.fromkeys(plan, 0)
    order = list(plan)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            if name in out:  # raised in an earlier round
                continue
            cs, (k, _) = calls[name], plan[name]
            j = pos[name]
            try:
                t0 = time.perf_counter()
                for _ in range(k):
                    cs[j % len(cs)]()
                    j += 1
                sync_fn()
                per_call[name].append((time.perf_counter() - t0) * 1e3 / k)
            except Exception as e:  # noqa: BLE001
                out[name] = e
            pos[name] = j
    for name, v in per_call.items():
        if name not in out:
            med, p20, p80 = _stats(v)
            out[name] = Timing(med, p20, p80, len(v), plan[name][0], "cpu", min(v))
    return out


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
    """The best FLOP/s (square matmuls in `dtype`) and bytes/s (copies, read + write, and read-only sums) over
    several sizes.

    A peak must be one: a single size under-reports it (on a CPU a 64 MiB copy runs at DRAM speed, while a
    benchmark shape that stays in cache moves bytes faster, which once gave "132 % of peak"). So each peak is
    the fastest sample over sizes from cache-resident to memory-bound. GPU: 4096^3 and 8192^3 matmuls, 256 MiB
    and 1 GiB copies (far above the L2, as the rotated benchmark inputs are); CPU: 256^3 to 1024^3, 256 KiB to
    64 MiB, every size timed in the same interleaved rounds (short samples: on a shared CPU the fastest of
    many is the rate the hardware sustains, the others include other processes' time slices).
    """
    device = torch.device(device)
    dt = str(dtype).replace("torch.", "")
    gpu = device.type == "cuda"
    sizes = (4096, 8192) if gpu else (256, 512, 1024)
    copies = (2**28, 2**30) if gpu else (2**18, 2**20, 2**22, 2**24, 2**26)
    mats = {n: tuple(torch.randn(n, n, device=device).to(dtype) for _ in range(3)) for n in sizes}
    bufs = {b: (torch.empty(b // 4, device=device).fill_(1.0), torch.empty(b // 4, device=device)) for b in copies}
    calls = {("mm", n): [lambda a=a, b=b, c=c: torch.mm(a, b, out=c)] for n, (a, b, c) in mats.items()}
    calls.update({("copy", b): [lambda s=s, d=d: d.copy_(s)] for b, (s, d) in bufs.items()})
    # A read-only pass too: reads cost less than writes (no read-for-ownership), so an op that mostly reads
    # (a GEMV streaming its weight) can beat any copy's rate.
    calls.update({("read", b): [lambda s=s: s.sum()] for b, (s, _) in bufs.items()})
    if gpu:
        timed = {k: benchmark(c, device, budget_ms=300.0, min_samples=5) for k, c in calls.items()}
    else:
        timed = benchmark_interleaved(calls, budget_ms=50.0, min_sample_ms=0.5, min_rounds=10)
    for k, t in timed.items():
        if isinstance(t, Exception):
            raise t
    del mats, bufs
    mm = max((2.0 * n ** 3 / (timed[("mm", n)].best_ms * 1e-3), n) for n in sizes)
    cp = max([(2.0 * b / (timed[("copy", b)].best_ms * 1e-3), b, "copy") for b in copies]
             + [(b / (timed[("read", b)].best_ms * 1e-3), b, "read") for b in copies])
    return {
        "matmul_flops": mm[0],
        "copy_bytes_per_s": cp[0],
        "matmul": f"best of {dt} matmuls {sizes[0]}^3..{sizes[-1]}^3 (at {mm[1]}^3)",
        "copy": f"best of copies (read + write) and reads of {_mib(copies[0])}..{_mib(copies[-1])} "
                f"(a {cp[2]} of {_mib(cp[1])})",
    }


def _mib(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"
