"""Per-call host overhead on a tiny layer: what eager PyTorch pays in Python and dispatch for one LoRA call.

A decode step of a 32-layer model with LoRA on 7 projections makes 224 such calls; at tens of µs each, host
time, not the kernels, decides eager latency at small batch (on a GPU as on a CPU).

Case: x [1, 64], 64 -> 64 without bias, r = 8, float32, one CPU thread (torch.set_num_threads(1), restored
after). Two phases: "no-grad" (forward under torch.no_grad) and "fwd+bwd" (forward, then
torch.autograd.grad for x, A and B). Wall clock, median over interleaved rounds of many calls each, with the
p20-p80 spread; on a GPU each sample ends with a synchronize, so the figure is the host time per call.

Calls:
    F.linear                the frozen layer alone (fwd+bwd: dx only)
    composite               F.linear + addmm_ LoRA term (no-grad); its autograd.Function for fwd+bwd
    peft                    PEFT's lora.Linear
    lk.lora_linear          backend=None (the default); lk.lora_linear[b] for each backend that runs here
    lk.LoRALinear           the module over lk.lora_linear
    module floor            a bare nn.Module whose forward only calls lk.lora_linear: what nn.Module.__call__
                            itself costs, the floor of the two modules' goals below
    patched peft            a PEFT lora.Linear after lk.patch_peft
    MultiLoRALinear         one slot, the token on it, its LoRABatch built outside the call (no-grad only)

The goals of issue 10 are data (GOALS) and printed next to the measured values as met / not met.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels.bench.bench_lora_linear import AddmmLoRA
from lora_kernels.bench.common import Context, make_peft_layer, make_row, na_row, peft_available, score, short_error
from lora_kernels.bench.timing import benchmark_interleaved, sync

SUITE = "overhead"
PHASES = ("no-grad", "fwd+bwd")
M, K, N, R = 1, 64, 64, 8
SCALING = 2.0
FUNCTIONAL = "lk.lora_linear"
MODULES = ("lk.LoRALinear", "patched peft")
MODULE_FLOOR = "module floor"
# Samples of many calls (one call of a few µs is near the timer's resolution), but short ones: on a shared
# machine a long sample is more often cut by another process, which moves the median.
MIN_SAMPLE_MS = 0.5
MIN_ROUNDS = 40

# (description, phase, contender, compared with, kind, bound): kind "ratio" = t / t_other <= bound,
# "extra_us" = (t - t_other) in µs <= bound.
GOALS = [
    ("lk.lora_linear no-grad <= 0.5x PEFT", "no-grad", FUNCTIONAL, "peft", "ratio", 0.5),
    ("lk.lora_linear fwd+bwd <= 0.9x PEFT", "fwd+bwd", FUNCTIONAL, "peft", "ratio", 0.9),
] + [(f"{m} adds <= 3 us over lk.lora_linear ({ph})", ph, m, FUNCTIONAL, "extra_us", 3.0)
     for m in MODULES for ph in PHASES]


def contenders(device: torch.device) -> list[str]:
    from lora_kernels import backends

    explicit = [b for b in backends.available_backends(device)
                if device.type == "cuda" or b not in ("triton", "composite")]  # no timing the interpreter
    return (["F.linear", "composite", "peft", FUNCTIONAL] + [f"{FUNCTIONAL}[{b}]" for b in explicit]
            + list(MODULES) + [MODULE_FLOOR, "MultiLoRALinear"])


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    lin.weight.requires_grad_(False)
    return lin


def build(name: str, x, W, A, B, phase: str) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """(forward callable, the tensors besides x that get gradients in fwd+bwd)."""
    import lora_kernels as lk

    if name == "F.linear":
        return (lambda: F.linear(x, W)), []
    if name == "composite":
        if phase == "fwd+bwd":
            return (lambda: AddmmLoRA.apply(x, W, None, A, B, SCALING, 0.0, True)), [A, B]
        return (lambda: F.linear(x, W).addmm_(torch.mm(x, A.T), B.T, alpha=SCALING)), []
    if name in ("peft", "patched peft"):
        layer = make_peft_layer(W, None, [("default", A, B, SCALING)])
        if name == "patched peft":
            report = lk.patch_peft(layer)
            if not report.num_patched:
                raise RuntimeError(f"patch_peft did not patch the layer: {report}")
        return (lambda: layer(x)), [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if name.startswith(FUNCTIONAL):
        backend = name[len(FUNCTIONAL) + 1:-1] or None
        return (lambda: lk.lora_linear(x, W, None, A, B, SCALING, backend=backend)), [A, B]
    if name == "lk.LoRALinear":
        layer = lk.LoRALinear(_linear(W), r=R, lora_alpha=SCALING * R)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        return (lambda: layer(x)), [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if name == MODULE_FLOOR:
        layer = _Floor()
        return (lambda: layer(x, W, A, B)), [A, B]
    if name == "MultiLoRALinear":
        if phase == "fwd+bwd":
            raise _NotApplicable("inference only")
        layer = lk.MultiLoRALinear(_linear(W), max_loras=1, max_rank=R)
        layer.set_slot(0, A.detach(), B.detach(), SCALING)
        batch = lk.LoRABatch.from_token_adapters(torch.zeros(M, dtype=torch.int32, device=x.device), num_slots=1)
        return (lambda: layer(x, batch)), []
    raise ValueError(f"unknown contender {name!r}")


class _NotApplicable(Exception):
    pass


class _Floor(nn.Module):
    def forward(self, x, W, A, B):
        import lora_kernels as lk

        return lk.lora_linear(x, W, None, A, B, SCALING)


def _call(fwd, x, params, g, phase):
    if phase == "no-grad":
        def call():
            with torch.no_grad():
                return fwd()
    else:
        def call():
            return torch.autograd.grad(fwd(), [x, *params], g)
    return call


def run(ctx: Context, names: Optional[list[str]] = None) -> list[dict]:
    """Rows for every (phase, call); every call of a phase is timed in the same interleaved rounds."""
    dev = ctx.device
    names = names or contenders(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(dev).requires_grad_()
    W = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dev)
    A = (torch.randn(R, K, generator=gen) * K ** -0.5).to(dev).requires_grad_()
    B = (torch.randn(N, R, generator=gen) * R ** -0.5).to(dev).requires_grad_()
    g = torch.randn(M, N, generator=gen).to(dev)
    case = {"model": "tiny", "proj": f"{K}x{N}", "in": K, "out": N, "bias": False, "r": R, "tokens": M,
            "dtype": "fp32", "adapter_dtype": "fp32", "dropout": 0.0, "threads": 1}
    peft_why = peft_available()
    rows: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for phase in PHASES:
            calls, out = {}, {}
            for c in names:
                if peft_why and "peft" in c:
                    out[c] = na_row(SUITE, phase, case, c, peft_why)
                    continue
                try:
                    fwd, params = build(c, x, W, A, B, phase)
                    calls[c] = [_call(fwd, x, params, g, phase)]
                    out[c] = make_row(SUITE, phase, case, c)
                except _NotApplicable as e:
                    out[c] = na_row(SUITE, phase, case, c, str(e))
                except Exception as e:  # noqa: BLE001 - reported as a row
                    out[c] = na_row(SUITE, phase, case, c, f"error: {short_error(e)}")
            timed = benchmark_interleaved(calls, budget_ms=ctx.budget_ms, min_sample_ms=MIN_SAMPLE_MS,
                                          min_rounds=MIN_ROUNDS, sync_fn=lambda: sync(dev))
            for c in names:
                ctx.tick(1, f"{SUITE} {phase} {c}")
                t = timed.get(c)
                if isinstance(t, Exception):
                    out[c] = na_row(SUITE, phase, case, c, f"error: {short_error(t)}")
                elif t is not None:
                    score(out[c], t, None, {})
                rows.append(out[c])
    finally:
        torch.set_num_threads(threads)
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Each goal of GOALS with its measured value ({"goal", "value", "unit", "met"}; value None if not measured)."""
    t = {(r["phase"], r["contender"]): r["ms"] * 1e3 for r in rows
         if r.get("suite") == SUITE and r.get("ms") is not None}
    out = []
    for desc, phase, c, other, kind, bound in GOALS:
        a, b = t.get((phase, c)), t.get((phase, other))
        if a is None or b is None:
            out.append({"goal": desc, "value": None, "unit": "", "met": None})
            continue
        v = a / b if kind == "ratio" else a - b
        out.append({"goal": desc, "value": v, "unit": "x" if kind == "ratio" else " us", "met": v <= bound})
    return out


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for gl in goals(rows):
        if gl["value"] is None:
            lines.append(f"{gl['goal']:<62} not measured")
        else:
            val = f"{gl['value']:.2f}{gl['unit']}" if gl["unit"] == "x" else f"{gl['value']:+.1f}{gl['unit']}"
            lines.append(f"{gl['goal']:<62} measured {val:>9}   {'met' if gl['met'] else 'NOT met'}")
    t = {(r["phase"], r["contender"]): r["ms"] * 1e3 for r in rows
         if r.get("suite") == SUITE and r.get("ms") is not None}
    for ph in PHASES:  # what any nn.Module adds (its __call__): the modules cannot add less
        if (ph, MODULE_FLOOR) in t and (ph, FUNCTIONAL) in t:
            extra = t[(ph, MODULE_FLOOR)] - t[(ph, FUNCTIONAL)]
            lines.append(f"{'(floor: a bare nn.Module adds, ' + ph + ')':<62} measured {extra:>+7.1f} us")
    return lines
