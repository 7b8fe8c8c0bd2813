"""Benchmark of the single-adapter fused op `lora_linear` (training shapes) against its alternatives.

    y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ        x: [M, in], W0: [out, in], A: [r, in], B: [out, r]

Contenders, all measured in the same run on the same values:
    base          F.linear(x, W0, b) (cuBLAS / the CPU BLAS through torch): the floor, no LoRA at all; in
                  fwd+bwd it computes dx only (W0 and b are frozen), the frozen layer a LoRA layer wraps
    peft          PEFT's real `lora.Linear` (get_peft_model on a one-layer module)
    torch-addmm   an unfused PyTorch autograd.Function that adds the LoRA term with in-place addmm_ in the
                  forward and the backward (the trick Unsloth uses), LoRA math in x's dtype
    ours          lora_kernels.lora_linear(..., backend=None): what a user gets by default
    ours:<b>      lora_kernels.lora_linear(..., backend=<b>) for every backend in lora_kernels.backends

Phases: "fwd" (inference, no autograd), "fwd+bwd" (frozen W0 and b; gradients for x, A and B; at every
dropout of `Context.dropouts`) and "memory" (one fwd+bwd step at dropout 0 and 0.1: bytes autograd saves
for backward on every device, and the peak CUDA memory above the inputs on a GPU).

The LoRA tax of a row is its time minus the base's time in the same case and run: the cost of the LoRA
side, which is all a LoRA implementation can change (the base GEMM is the same BLAS call for everyone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lora_kernels.backends import BACKENDS
from lora_kernels.bench.common import (Context, Unavailable, check_row, make_peft_layer, make_row, na_row,
                                       peft_available, recover, score, short_error, time_group)
from lora_kernels.bench.roofline import DISTINCT_PROJS, MODELS, base_gemm_work, lora_linear_work
from lora_kernels.bench.timing import peak_memory_bytes, rotating_sets, saved_for_backward_bytes

SUITE = "lora_linear"
OURS = ("ours",) + tuple(f"ours:{b}" for b in BACKENDS)
CONTENDERS = ("base", "peft", "torch-addmm") + OURS
PHASES = ("fwd", "fwd+bwd", "memory")
RANKS = (8, 16, 64)
TOKENS = (1, 16, 128, 1024, 8192)
DROPOUTS = (0.0, 0.1)           # fwd+bwd rows; PEFT copies x and draws a mask, ours regenerates it
MEMORY_DROPOUTS = (0.0, 0.1)
SCALING = 2.0

# (model, projection, rank, tokens): the cases `--quick` runs on a GPU and the README / RESULTS.md headline table.
HEADLINE = [
    ("llama3-8b", "q", 16, 1),
    ("llama3-8b", "q", 16, 128),
    ("llama3-8b", "q", 16, 8192),
    ("llama3-8b", "down", 16, 8192),
    ("qwen2-0.5b", "q", 16, 1024),
]
# The same cases scaled for a CPU (`--quick` without a GPU): decode and a 128-token batch of a square
# projection, a wide one (Qwen2-0.5B's MLP gate, 896 -> 4864) and a long-K one (its down projection).
CPU_HEADLINE = [
    ("qwen2-0.5b", "q", 16, 1),
    ("qwen2-0.5b", "q", 16, 128),
    ("qwen2-0.5b", "gate", 16, 128),
    ("qwen2-0.5b", "down", 16, 32),
]
# The full grid without a GPU: small shapes the CPU backends finish in seconds.
CPU_CASES = [
    ("qwen2-0.5b", "q", 16, 1),
    ("qwen2-0.5b", "q", 16, 16),
    ("qwen2-0.5b", "q", 16, 128),
    ("qwen2-0.5b", "k", 8, 128),
    ("qwen2-0.5b", "gate", 16, 128),
    ("qwen2-0.5b", "down", 16, 32),
]


@dataclass(frozen=True)
class Case:
    model: str
    proj: str
    K: int
    N: int
    bias: bool
    r: int
    M: int

    def as_dict(self) -> dict:
        return {"model": self.model, "proj": self.proj, "in": self.K, "out": self.N, "bias": self.bias,
                "r": self.r, "tokens": self.M}

    @property
    def label(self) -> str:
        return f"{self.model} {self.proj} {self.K}->{self.N} r={self.r} M={self.M}"


def make_case(model: str, proj: str, r: int, M: int) -> Case:
    K, N, bias = MODELS[model][proj]
    return Case(model, proj, K, N, bias, r, M)


def grid(models, projs, ranks, tokens, shapes=()) -> list[Case]:
    """The cross product; `shapes` adds custom (in, out) projections as model "custom"."""
    cases = []
    for model in models:
        for proj in projs:
            for r in ranks:
                for M in tokens:
                    cases.append(make_case(model, proj, r, M))
    for K, N in shapes:
        for r in ranks:
            for M in tokens:
                cases.append(Case("custom", f"{K}x{N}", K, N, False, r, M))
    return cases


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return [make_case(*c) for c in (CPU_HEADLINE if quick else CPU_CASES)]
    if quick:
        return [make_case(*c) for c in HEADLINE]
    return grid(MODELS, DISTINCT_PROJS, RANKS, TOKENS)


# ------------------------------------------------------------------------------------------------------
# Inputs and contenders
# ------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    x: torch.Tensor          # [M, K], requires grad
    weight: torch.Tensor     # [N, K], frozen
    bias: Optional[torch.Tensor]
    A: torch.Tensor          # [r, K], requires grad, adapter dtype
    B: torch.Tensor          # [N, r], requires grad, adapter dtype
    g: torch.Tensor          # [M, N] upstream gradient

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.x, self.weight, self.bias, self.A, self.B, self.g) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> "Inputs":
        c = [None if t is None else t.detach().clone() for t in (self.x, self.weight, self.bias, self.A,
                                                                   self.B, self.g)]
        return Inputs(c[0].requires_grad_(), c[1], c[2], c[3].requires_grad_(), c[4].requires_grad_(), c[5])


def make_inputs(case: Case, ctx: Context, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt, adt = ctx.device, ctx.dtype, ctx.adapter_dtype

    def rnd(*shape, std=1.0, dtype=dt):
        return (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dtype)

    # B is not zero (PEFT's init) so that the LoRA term is checked, and scaled so it is O(1) like x W0ᵀ.
    return Inputs(
        x=rnd(case.M, case.K).requires_grad_(),
        weight=rnd(case.N, case.K, std=case.K ** -0.5),
        bias=rnd(case.N) if case.bias else None,
        A=rnd(case.r, case.K, std=case.K ** -0.5, dtype=adt).requires_grad_(),
        B=rnd(case.N, case.r, std=case.r ** -0.5, dtype=adt).requires_grad_(),
        g=rnd(case.M, case.N),
    )


class AddmmLoRA(torch.autograd.Function):
    """Unfused LoRA with in-place addmm_: y = x W0ᵀ + b, then y += s (x̂ Aᵀ) Bᵀ in place; the backward
    likewise adds (dS A) into dx = G W0 in place. LoRA math runs in x's dtype; a dropout mask is stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, dropout_p, training):
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)
        mask = None
        x_hat = x
        if training and dropout_p > 0:
            mask = torch.rand_like(x) >= dropout_p
            x_hat = x * mask * (1.0 / (1.0 - dropout_p))
        S = x_hat @ Ac.T
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y.addmm_(S, Bc.T, alpha=scaling)
        ctx.save_for_backward(x_hat, weight, Ac, Bc, S, mask)
        ctx.scaling, ctx.dropout_p, ctx.adtypes = scaling, dropout_p, (A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, G):
        x_hat, weight, Ac, Bc, S, mask = ctx.saved_tensors
        s = ctx.scaling
        need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        dS = torch.mm(G, Bc).mul_(s)
        dx = dA = dB = None
        if need_dB:
            dB = torch.mm(G.T, S).mul_(s).to(ctx.adtypes[1])
        if need_dA:
            dA = torch.mm(dS.T, x_hat).to(ctx.adtypes[0])
        if need_dx:
            dx = G @ weight
            if mask is None:
                dx.addmm_(dS, Ac)
            else:
                dx.add_((dS @ Ac) * mask, alpha=1.0 / (1.0 - ctx.dropout_p))
        return dx, None, None, dA, dB, None, None, None


def contender_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when `name` can run on `device`, else the reason shown (once) under its table."""
    if name == "peft":
        return peft_available()
    if name.startswith("ours:"):
        from lora_kernels import backends

        b = name.split(":", 1)[1]
        if b in ("triton", "composite") and device.type != "cuda":
            return "Triton kernels need a CUDA device (the interpreter is for tests, not timing)"
        if b not in backends.available_backends(device):
            if b == "native":
                return f"extension lora_kernels._C not built for {device.type} ({backends.NATIVE_ERROR[:80]})"
            if b in ("triton", "composite"):
                return "triton is not installed"
            return f"backend {b!r} unavailable on {device.type}"
    return None


def ours_backend(name: str) -> Optional[str]:
    """The `backend=` argument of an "ours" contender: None for "ours", b for "ours:b"."""
    return name.split(":", 1)[1] if ":" in name else None


def build(name: str, inp: Inputs, dropout_p: float, training: bool) -> tuple[Callable[[], torch.Tensor],
                                                                            list[torch.Tensor]]:
    """(forward callable on this input set, the tensors besides x that get gradients)."""
    x, W, b = inp.x, inp.weight, inp.bias
    if name == "base":
        return (lambda: F.linear(x, W, b)), []
    if name == "peft":
        layer = make_peft_layer(W, b, [("default", inp.A, inp.B, SCALING)], dropout_p)
        layer.train(training)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (lambda: layer(x)), params
    if name == "torch-addmm":
        A, B = inp.A, inp.B
        return (lambda: AddmmLoRA.apply(x, W, b, A, B, SCALING, dropout_p, training)), [A, B]
    if name in OURS:
        import lora_kernels as lk

        backend, A, B = ours_backend(name), inp.A, inp.B
        return (lambda: lk.lora_linear(x, W, b, A, B, SCALING, dropout_p=dropout_p, training=training,
                                       backend=backend)), [A, B]
    raise Unavailable(f"unknown contender {name!r}")


def _fwd_call(fwd):
    def call():
        with torch.no_grad():
            return fwd()
    return call


def _step_call(fwd, x, params, g):
    def call():
        y = fwd()
        return torch.autograd.grad(y, [x, *params], g)
    return call


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------

def jobs_per_case(contenders, phases, dropouts=DROPOUTS) -> int:
    n = 0
    for ph in phases:
        n += len(contenders) * len(MEMORY_DROPOUTS if ph == "memory" else dropouts if ph == "fwd+bwd" else (0.0,))
    return n


def run(cases: list[Case], contenders, phases, ctx: Context, memory_cases: Optional[set] = None) -> list[dict]:
    """Rows for every (case, phase, dropout, contender). `memory_cases` limits the memory phase to those
    cases (None: all)."""
    rows: list[dict] = []
    reasons = {c: contender_unavailable(c, ctx.device) for c in contenders}
    for case in cases:
        ph = [p for p in phases if p != "memory" or memory_cases is None or case in memory_cases]
        rows += run_case(case, contenders, ph, ctx, reasons)
    return rows


def _groups(phases, ctx: Context):
    """(phase, dropout) of every timed group and memory pass, in run order."""
    for ph in phases:
        if ph == "memory":
            yield ph, None
        else:
            for p in (ctx.dropouts if ph == "fwd+bwd" else (0.0,)):
                yield ph, p


def run_case(case: Case, contenders, phases, ctx: Context, reasons: dict) -> list[dict]:
    rows: list[dict] = []
    cd = case.as_dict()
    cd.update(dtype=str(ctx.dtype).replace("torch.", ""), adapter_dtype=str(ctx.adapter_dtype).replace("torch.", ""))
    why_not = "time budget used up" if ctx.out_of_time() else None
    first = None
    if why_not is None:
        try:
            first = make_inputs(case, ctx)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the largest shapes
            recover(ctx.device)
            why_not = f"inputs: {short_error(e)}"
    if why_not is not None:
        for ph, p in _groups(phases, ctx):
            for q in (MEMORY_DROPOUTS if ph == "memory" else (p,)):
                for c in contenders:
                    rows.append(na_row(SUITE, ph, dict(cd, dropout=q), c, why_not))
                    ctx.tick(1, case.label)
        return rows
    n_sets = rotating_sets(first.nbytes(), ctx.device)
    sets = [first] + [first.clone() for _ in range(n_sets - 1)]
    ref = None
    if ctx.check:
        from lora_kernels.reference import lora_linear_forward

        with torch.no_grad():
            ref, _ = lora_linear_forward(first.x, first.weight, first.bias, first.A, first.B, SCALING)
    e = first.x.element_size()
    a = first.A.element_size()

    for phase, p in _groups(phases, ctx):
        if phase == "memory":
            rows += _memory_rows(case, cd, contenders, ctx, reasons, first)
            continue
        bwd = phase == "fwd+bwd"
        d = dict(cd, dropout=p)
        group_rows, calls = {}, {}
        for c in contenders:
            if reasons[c] or ctx.out_of_time():
                group_rows[c] = na_row(SUITE, phase, d, c, reasons[c] or "time budget used up")
                continue
            row = make_row(SUITE, phase, d, c, sets=n_sets)
            try:
                built = [build(c, s, p, training=bwd) for s in sets]
                if bwd:
                    calls[c] = [_step_call(f, s.x, prm, s.g) for (f, prm), s in zip(built, sets)]
                else:
                    calls[c] = [_fwd_call(f) for f, _ in built]
                if ref is not None and not bwd and c != "base":  # base has no LoRA term
                    check_row(row, calls[c][0](), ref, ctx.dtype)
            except Exception as ex:  # noqa: BLE001 - one contender failing never stops the run
                recover(ctx.device)
                calls.pop(c, None)
                row = na_row(SUITE, phase, d, c, f"error: {short_error(ex)}")
            group_rows[c] = row
        timed = time_group(calls, ctx, {})
        for c in contenders:
            ctx.tick(1, f"{case.label} {phase}" + (f" p={p}" if p else ""))
            row = group_rows[c]
            t = timed.timings.get(c)
            if isinstance(t, Exception):
                row = na_row(SUITE, phase, d, c, f"error: {short_error(t)}")
            elif t is not None:
                work = (base_gemm_work(case.M, case.K, case.N, e, case.bias, bwd) if c == "base"
                        else lora_linear_work(case.M, case.K, case.N, case.r, e, a, case.bias, bwd))
                score(row, t, work, ctx.peaks)
                if c == "base" and timed.base_eager_ms is not None:
                    row["eager_ms"] = timed.base_eager_ms
                if timed.use_graph and row["mode"] != "graph":
                    row["reason"] = (row["reason"] + "; " if row["reason"] else "") + "graph capture failed: eager"
            rows.append(row)
        calls = group_rows = timed = None  # noqa: F841 - free this group's copies before the next one
    del sets, first
    return rows


def _memory_rows(case, cd, contenders, ctx, reasons, inp: Inputs) -> list[dict]:
    rows = []
    for p in MEMORY_DROPOUTS:
        for c in contenders:
            ctx.tick(1, f"{case.label} memory p={p} {c}")
            d = dict(cd, dropout=p)
            if reasons[c]:
                rows.append(na_row(SUITE, "memory", d, c, reasons[c]))
                continue
            if ctx.out_of_time():
                rows.append(na_row(SUITE, "memory", d, c, "time budget used up"))
                continue
            try:
                fwd, params = build(c, inp, p, training=True)
                exclude = inp.tensors() + params
                saved = saved_for_backward_bytes(fwd, exclude)
                peak = peak_memory_bytes(_step_call(fwd, inp.x, params, inp.g), ctx.device)
                rows.append(make_row(SUITE, "memory", d, c, saved_mb=saved / 1e6,
                                     peak_mb=None if peak is None else peak / 1e6))
            except Exception as ex:  # noqa: BLE001
                recover(ctx.device)
                rows.append(na_row(SUITE, "memory", d, c, f"error: {short_error(ex)}"))
    return rows
