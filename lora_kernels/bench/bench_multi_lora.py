"""Benchmark of multi-adapter serving, `multi_lora_linear`, against its alternatives (forward only).

    y_t = x_t W0ᵀ + b + s_j (x_t A_jᵀ) B_jᵀ,   j = adapter of token t;  x: [T, in], A_j: [r, in], B_j: [out, r]

Each case is a batch of S sequences, every sequence served by one of d distinct adapters (d stacked adapter
slots; sequence i uses adapter i mod d, sequences shuffled), at decode (1 token per sequence) or prefill
(L tokens per sequence). Adapters are stored in the model dtype, as serving systems do.

Contenders, all measured in the same run on the same values:
    base          F.linear(x, W0, b): the floor, no adapters
    peft-mixed    PEFT's `lora.Linear` holding the d adapters, called with `adapter_names=` (its mixed-batch path)
    torch-loop    unfused PyTorch: base GEMM, then per adapter index_select -> two GEMMs -> in-place index_add_
                  (token indices prepared outside the timed call)
    ours          lora_kernels multi_lora_linear(..., backend=None) (the default), and
    ours:<b>      the same with backend=<b>; the batch metadata (LoRABatch) is built outside the timed call:
                  a server builds it once per step and shares it across layers
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lora_kernels.backends import BACKENDS
from lora_kernels.bench.common import (Context, Unavailable, check_row, make_peft_layer, make_row, na_row,
                                       peft_available, recover, score, short_error, time_group)
from lora_kernels.bench.roofline import MODELS, base_only_work, multi_lora_work
from lora_kernels.bench.timing import rotating_sets

SUITE = "multi_lora"
OURS = ("ours",) + tuple(f"ours:{b}" for b in BACKENDS)
CONTENDERS = ("base", "peft-mixed", "torch-loop") + OURS
ADAPTERS = (1, 8, 64, 256)
DECODE_SEQS = 256
PREFILL_SEQS, PREFILL_LEN = 256, 16
PEFT_MAX_SETS = 4  # building PEFT layers with hundreds of adapters is slow; its times are far above L2 effects

# (model, projection, rank, phase, tokens, distinct adapters): `--quick` and the headline table.
HEADLINE = [
    ("llama3-8b", "q", 16, "decode", DECODE_SEQS, 1),
    ("llama3-8b", "q", 16, "decode", DECODE_SEQS, 64),
    ("llama3-8b", "q", 16, "decode", DECODE_SEQS, 256),
    ("llama3-8b", "q", 16, "prefill", PREFILL_SEQS * PREFILL_LEN, 64),
]


@dataclass(frozen=True)
class ServeCase:
    model: str
    proj: str
    K: int
    N: int
    bias: bool
    r: int
    phase: str   # "decode" | "prefill"
    seqs: int
    seq_len: int
    d: int

    @property
    def T(self) -> int:
        return self.seqs * self.seq_len

    def as_dict(self) -> dict:
        return {"model": self.model, "proj": self.proj, "in": self.K, "out": self.N, "bias": self.bias,
                "r": self.r, "tokens": self.T, "seqs": self.seqs, "adapters": self.d}

    @property
    def label(self) -> str:
        return f"{self.model} {self.proj} {self.K}->{self.N} r={self.r} {self.phase} T={self.T} d={self.d}"


def make_case(model, proj, r, phase, seqs, seq_len, d) -> ServeCase:
    if model == "custom":
        K, N = (int(v) for v in proj.split("x"))
        bias = False
    else:
        K, N, bias = MODELS[model][proj]
    return ServeCase(model, proj, K, N, bias, r, phase, seqs, seq_len, d)


def grid(models, projs, r, adapters, decode_seqs=DECODE_SEQS, prefill_seqs=PREFILL_SEQS,
         prefill_len=PREFILL_LEN, phases=("decode", "prefill"), shapes=()) -> list[ServeCase]:
    cases = []
    targets = [(m, p) for m in models for p in projs] + [("custom", f"{K}x{N}") for K, N in shapes]
    for model, proj in targets:
        for phase in phases:
            seqs, L = (decode_seqs, 1) if phase == "decode" else (prefill_seqs, prefill_len)
            for d in adapters:
                cases.append(make_case(model, proj, r, phase, seqs, L, d))
    return cases


def default_cases(device: torch.device, quick: bool) -> list[ServeCase]:
    if device.type != "cuda":
        if quick:  # the headline cases scaled down: decode over 1, 8 and 32 adapters, a prefill over 8
            return (grid(["qwen2-0.5b"], ["q"], 16, (1, 8, 32), decode_seqs=32, phases=("decode",))
                    + grid(["qwen2-0.5b"], ["q"], 16, (8,), prefill_seqs=32, prefill_len=8, phases=("prefill",)))
        return grid(["qwen2-0.5b"], ["q"], 16, (1, 8, 32), decode_seqs=32, prefill_seqs=32, prefill_len=8)
    if quick:
        return [make_case(m, p, r, ph, T if ph == "decode" else PREFILL_SEQS, 1 if ph == "decode" else PREFILL_LEN, d)
                for m, p, r, ph, T, d in HEADLINE]
    return grid(["llama3-8b", "qwen2-0.5b"], ["q", "down"], 16, ADAPTERS)


# ------------------------------------------------------------------------------------------------------
# Inputs and contenders
# ------------------------------------------------------------------------------------------------------

@dataclass
class ServeInputs:
    x: torch.Tensor             # [T, K]
    weight: torch.Tensor        # [N, K]
    bias: Optional[torch.Tensor]
    A_stack: torch.Tensor       # [d, r, K]
    B_stack: torch.Tensor       # [d, N, r]
    scalings: torch.Tensor      # [d] float32
    token_adapter: torch.Tensor  # [T] int32, adapter slot of each token
    seqs: int

    def tensors(self):
        return [t for t in (self.x, self.weight, self.bias, self.A_stack, self.B_stack, self.scalings,
                            self.token_adapter) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> "ServeInputs":
        c = [None if t is None else t.clone() for t in (self.x, self.weight, self.bias, self.A_stack,
                                                          self.B_stack, self.scalings, self.token_adapter)]
        return ServeInputs(*c, seqs=self.seqs)


def make_inputs(case: ServeCase, ctx: Context, seed: int = 0) -> ServeInputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt = ctx.device, ctx.dtype

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dt)

    seq_adapter = torch.arange(case.seqs) % case.d
    seq_adapter = seq_adapter[torch.randperm(case.seqs, generator=gen)]
    token_adapter = seq_adapter.repeat_interleave(case.seq_len).to(device=dev, dtype=torch.int32)
    return ServeInputs(
        x=rnd(case.T, case.K),
        weight=rnd(case.N, case.K, std=case.K ** -0.5),
        bias=rnd(case.N) if case.bias else None,
        A_stack=rnd(case.d, case.r, case.K, std=case.K ** -0.5),
        B_stack=rnd(case.d, case.N, case.r, std=case.r ** -0.5),
        scalings=(1.0 + 0.5 * (torch.arange(case.d) % 4)).to(device=dev, dtype=torch.float32),
        token_adapter=token_adapter,
        seqs=case.seqs,
    )


def reference(inp: ServeInputs) -> torch.Tensor:
    """float32 y computed token group by token group."""
    x = inp.x.float()
    y = F.linear(x, inp.weight.float(), None if inp.bias is None else inp.bias.float())
    ta = inp.token_adapter.long()
    for j in range(inp.A_stack.shape[0]):
        ix = (ta == j).nonzero().squeeze(1)
        if ix.numel():
            y[ix] += inp.scalings[j].item() * (x[ix] @ inp.A_stack[j].float().T) @ inp.B_stack[j].float().T
    return y


def multi_lora_api():
    """(multi_lora_linear, LoRABatch) from lora_kernels, or raise Unavailable saying why."""
    try:
        from lora_kernels.ops.multi_lora import LoRABatch, multi_lora_linear
    except Exception as e:  # noqa: BLE001 - not written yet, or broken import
        raise Unavailable(f"multi_lora op not available ({type(e).__name__})")
    return multi_lora_linear, LoRABatch


def contender_unavailable(name: str, device: torch.device) -> Optional[str]:
    if name == "peft-mixed":
        return peft_available()
    if name in OURS:
        try:
            multi_lora_api()
        except Unavailable as e:
            return str(e)
        if name == "ours":
            return None
        from lora_kernels.bench.bench_lora_linear import contender_unavailable as single

        why = single(name, device)
        if why is None and name == "ours:native":
            try:
                getattr(torch.ops.lora_kernels, "native_multi_lora_linear")
            except (AttributeError, RuntimeError):
                why = "the native extension has no multi_lora_linear kernel (yet)"
        return why
    return None


def build(name: str, inp: ServeInputs) -> tuple[Callable[[], torch.Tensor], bool]:
    """(forward callable, whether it may be captured in a CUDA graph)."""
    x, W, b = inp.x, inp.weight, inp.bias
    d = inp.A_stack.shape[0]
    if name == "base":
        return (lambda: F.linear(x, W, b)), True
    if name == "peft-mixed":
        s = inp.scalings.tolist()
        adapters = [(f"a{j}", inp.A_stack[j], inp.B_stack[j], s[j]) for j in range(d)]
        layer = make_peft_layer(W, b, adapters).eval()
        L = x.shape[0] // inp.seqs
        x3 = x.view(inp.seqs, L, x.shape[1])
        names = [f"a{j}" for j in inp.token_adapter.view(inp.seqs, L)[:, 0].tolist()]
        # PEFT indexes the batch with Python lists (host-to-device copies): not capturable.
        return (lambda: layer(x3, adapter_names=names)), False
    if name == "torch-loop":
        ta = inp.token_adapter.long()
        groups = [(j, (ta == j).nonzero().squeeze(1)) for j in range(d)]
        groups = [(j, ix) for j, ix in groups if ix.numel()]
        s = inp.scalings.tolist()
        A, B = inp.A_stack, inp.B_stack

        def loop():
            y = F.linear(x, W, b)
            for j, ix in groups:
                y.index_add_(0, ix, (x.index_select(0, ix) @ A[j].T) @ B[j].T, alpha=s[j])
            return y
        return loop, True
    if name in OURS:
        multi_lora_linear, LoRABatch = multi_lora_api()
        backend = name.split(":", 1)[1] if ":" in name else None
        batch = LoRABatch.from_token_adapters(inp.token_adapter, d)
        A, B, s = inp.A_stack, inp.B_stack, inp.scalings
        return (lambda: multi_lora_linear(x, W, b, A, B, s, batch, backend=backend)), True
    raise Unavailable(f"unknown contender {name!r}")


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------

def run(cases: list[ServeCase], contenders, ctx: Context) -> list[dict]:
    rows: list[dict] = []
    reasons = {c: contender_unavailable(c, ctx.device) for c in contenders}
    for case in cases:
        rows += run_case(case, contenders, ctx, reasons)
    return rows


def run_case(case: ServeCase, contenders, ctx: Context, reasons: dict) -> list[dict]:
    cd = case.as_dict()
    cd.update(dtype=str(ctx.dtype).replace("torch.", ""), adapter_dtype=str(ctx.dtype).replace("torch.", ""))
    rows: list[dict] = []
    why_not = None
    if case.d > case.seqs:
        why_not = f"{case.d} adapters need at least as many sequences (have {case.seqs})"
    elif ctx.out_of_time():
        why_not = "time budget used up"
    first = None
    if why_not is None:
        try:
            first = make_inputs(case, ctx)
        except Exception as e:  # noqa: BLE001
            recover(ctx.device)
            why_not = f"inputs: {short_error(e)}"
    if why_not is not None:
        for c in contenders:
            ctx.tick(1, case.label)
            rows.append(na_row(SUITE, case.phase, cd, c, why_not))
        return rows

    n_sets = rotating_sets(first.nbytes(), ctx.device)
    sets = [first] + [first.clone() for _ in range(n_sets - 1)]
    ref = reference(first) if ctx.check else None
    e = first.x.element_size()
    group_rows, calls, graphable = {}, {}, {}
    for c in contenders:
        if reasons[c] or ctx.out_of_time():
            group_rows[c] = na_row(SUITE, case.phase, cd, c, reasons[c] or "time budget used up")
            continue
        my_sets = sets[:PEFT_MAX_SETS] if c == "peft-mixed" else sets
        row = make_row(SUITE, case.phase, cd, c, sets=len(my_sets))
        try:
            built = [build(c, s) for s in my_sets]
            graphable[c] = built[0][1]
            calls[c] = [_no_grad(f) for f, _ in built]
            if ref is not None and c != "base":  # base has no LoRA term
                check_row(row, calls[c][0](), ref, ctx.dtype)
        except Exception as ex:  # noqa: BLE001
            recover(ctx.device)
            calls.pop(c, None)
            row = na_row(SUITE, case.phase, cd, c, f"error: {short_error(ex)}")
        group_rows[c] = row
    timed = time_group(calls, ctx, graphable)
    for c in contenders:
        ctx.tick(1, case.label)
        row = group_rows[c]
        t = timed.timings.get(c)
        if isinstance(t, Exception):
            row = na_row(SUITE, case.phase, cd, c, f"error: {short_error(t)}")
        elif t is not None:
            work = (base_only_work(case.T, case.K, case.N, e, case.bias) if c == "base"
                    else multi_lora_work(case.T, case.K, case.N, case.r, case.d, e, e, case.bias))
            score(row, t, work, ctx.peaks)
            if c == "base" and timed.base_eager_ms is not None:
                row["eager_ms"] = timed.base_eager_ms
            if timed.use_graph and row["mode"] != "graph":
                why = "not capturable" if not graphable.get(c, True) else "graph capture failed"
                row["reason"] = (row["reason"] + "; " if row["reason"] else "") + f"{why}: eager time"
        rows.append(row)
    return rows


def _no_grad(f):
    def call():
        with torch.no_grad():
            return f()
    return call
