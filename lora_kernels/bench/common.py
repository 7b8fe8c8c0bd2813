"""Pieces shared by the benchmark suites: run context, result rows, PEFT layer construction, checks."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from lora_kernels.bench.roofline import Work
from lora_kernels.bench.timing import Timing, benchmark, benchmark_interleaved, sync

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative-RMS error a contender's forward may show against the float32 reference before its row is
# flagged WRONG: a sanity check that a fast number is a right number, not the test suite.
CHECK_RTOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Launch-bound cases: when the base GEMM's eager time is below this, every contender of the case is timed
# from CUDA-graph replays (with graph="auto").
GRAPH_BELOW_MS = 0.1


class Unavailable(Exception):
    """A contender that cannot run here; its row says why instead of a time."""


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    budget_ms: float = 200.0
    graph: str = "auto"                   # "auto" | "always" | "never"
    check: bool = True
    deadline: float = math.inf            # time.monotonic() after which remaining cases are skipped
    dropouts: tuple = (0.0, 0.1)          # lora_linear fwd+bwd rows are measured at each of these
    peaks: dict = field(default_factory=dict)
    progress: Any = None
    log: Callable[[str], None] = print

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def tick(self, n: int = 1, desc: str = "") -> None:
        if self.progress is not None:
            self.progress.update(n, desc)


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dt, str(dt).replace("torch.", ""))


def make_row(suite: str, phase: str, case: dict, contender: str, **kw) -> dict:
    row = {"suite": suite, "phase": phase, **case, "contender": contender, "status": "ok", "reason": ""}
    row.update(kw)
    return row


def na_row(suite, phase, case, contender, reason: str) -> dict:
    return make_row(suite, phase, case, contender, status="n/a", reason=reason)


def score(row: dict, t: Timing, work: Optional[Work], peaks: dict) -> dict:
    """Fill time, achieved rates and % of the measured-peak roofline into `row` (only the time without `work`)."""
    row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, mode=t.mode, samples=t.samples,
               calls_per_sample=t.calls_per_sample)
    if work is None:
        return row
    s = t.median_ms * 1e-3
    row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, mode=t.mode, samples=t.samples,
               calls_per_sample=t.calls_per_sample, flops=work.flops, bytes=work.bytes,
               tflops=work.flops / s / 1e12, gbps=work.bytes / s / 1e9)
    if peaks.get("matmul_flops") and peaks.get("copy_bytes_per_s"):
        row["pct_peak"] = 100.0 * work.floor_s(peaks["matmul_flops"], peaks["copy_bytes_per_s"]) / s
    return row


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


def recover(device: torch.device) -> None:
    """After a failed contender: drain the stream and give cached blocks back so the next one starts clean."""
    if device.type == "cuda":
        try:
            sync(device)
        except Exception:  # noqa: BLE001 - an async error surfaces here; nothing more to do
            pass
        torch.cuda.empty_cache()


def time_calls(calls: list[Callable[[], Any]], ctx: Context, use_graph: bool, graphable: bool) -> Timing:
    """Graph replay when asked for and the contender can be captured; eager CUDA events (or CPU) otherwise.
    A failed capture falls back to eager timing (the row's `mode` says which one was used)."""
    if use_graph and graphable and ctx.device.type == "cuda":
        try:
            return benchmark(calls, ctx.device, graph=True, budget_ms=ctx.budget_ms)
        except Exception:  # noqa: BLE001 - e.g. a host sync inside the op: time it eagerly instead
            recover(ctx.device)
    return benchmark(calls, ctx.device, graph=False, budget_ms=ctx.budget_ms)


@dataclass
class GroupTiming:
    """What `time_group` measured: a Timing (or the exception raised) per contender, and on a GPU whether
    the case was timed from CUDA-graph replays and the base's eager time."""
    timings: dict
    use_graph: bool = False
    base_eager_ms: Optional[float] = None


def time_group(calls: dict[str, list[Callable[[], Any]]], ctx: Context, graphable: dict[str, bool]) -> GroupTiming:
    """Time all contenders of one case (`calls` in run order, the floor "base" first when present).

    CPU: interleaved rounds (timing.benchmark_interleaved), so a shared, noisy machine slows all alike.
    GPU: one contender after the other with CUDA events; with ctx.graph == "auto", a case whose base GEMM
    takes under GRAPH_BELOW_MS eagerly is launch-bound, and every contender is then timed from CUDA-graph
    replays (contenders that cannot be captured stay eager).
    """
    if ctx.device.type != "cuda":
        return GroupTiming(benchmark_interleaved(calls, budget_ms=ctx.budget_ms))
    out = GroupTiming({}, use_graph=ctx.graph == "always")
    for name, cs in calls.items():
        try:
            t = time_calls(cs, ctx, out.use_graph, graphable.get(name, True))
            if name == "base" and ctx.graph == "auto" and t.median_ms < GRAPH_BELOW_MS:
                out.use_graph, out.base_eager_ms = True, t.median_ms
                t = time_calls(cs, ctx, True, True)
            out.timings[name] = t
        except Exception as e:  # noqa: BLE001 - one contender failing never stops the run
            recover(ctx.device)
            out.timings[name] = e
    return out


def rel_rms_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    den = ref.norm().item()
    num = (y - ref).norm().item()
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def check_row(row: dict, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_rms_error(y.reshape(ref.shape), ref)
    row["rel_err"] = err
    if not err <= CHECK_RTOL[dtype]:  # NaN fails too
        row["status"] = "wrong"
        row["reason"] = f"forward differs from the reference: relative RMS error {err:.2e}"


# ------------------------------------------------------------------------------------------------------
# PEFT's real lora.Linear, built through its public API around a one-layer module
# ------------------------------------------------------------------------------------------------------

def peft_available() -> Optional[str]:
    """None when PEFT imports, else why not."""
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a transformers version clash
        return f"peft not importable ({short_error(e)}); pip install peft"
    return None


class _OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        out_f, in_f = weight.shape
        self.proj = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        self.proj.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            self.proj.bias = nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def make_peft_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], adapters: list[tuple],
                    dropout_p: float = 0.0) -> nn.Module:
    """PEFT's `lora.Linear` wrapping `weight`/`bias` (shared, frozen) with adapters [(name, A, B, scaling)].

    A: [r, in], B: [out, r] become the adapters' parameters (shared storage, requires_grad=True), so PEFT
    runs on exactly the values and dtypes the other contenders see.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLoraLinear

    name0, A0, _, _ = adapters[0]
    r = A0.shape[0]
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout_p, target_modules=["proj"], bias="none")
    base = _OneLinear(weight, bias)
    try:
        model = get_peft_model(base, cfg, adapter_name=name0, autocast_adapter_dtype=False)
    except TypeError:  # PEFT < 0.12 has no autocast_adapter_dtype
        model = get_peft_model(base, cfg, adapter_name=name0)
    for name, *_ in adapters[1:]:
        model.add_adapter(name, cfg)
    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear):
        raise Unavailable(f"PEFT built {type(layer).__name__}, not lora.Linear")
    for name, A, B, s in adapters:
        layer.lora_A[name].weight = nn.Parameter(A.detach(), requires_grad=True)
        layer.lora_B[name].weight = nn.Parameter(B.detach(), requires_grad=True)
        layer.scaling[name] = float(s)
    layer.set_adapter(name0)
    return layer
