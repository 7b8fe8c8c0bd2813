"""Benchmark of multi-adapter training: one joint fwd+bwd of N adapters against N sequential PEFT passes.

    y_t = x_t W0ᵀ + b + s_j (x_t A_jᵀ) B_jᵀ,  j = adapter of token t;   grads: dx, dA_j, dB_j (W0, b frozen)

Each case is a batch of S sequences of L tokens, sequence i trained by adapter i mod N (sequences shuffled):
the rows `MultiLoRAModel` gives one layer in a joint training step. Adapters are in the model dtype.

Contenders, measured in the same run (interleaved on a CPU) on the same values:
    base       F.linear fwd + bwd (dx only): the floor, no adapters
    peft-seq   N PEFT `lora.Linear` passes, one per adapter on its own rows, each forward + backward
               (dx_j, dA_j, dB_j) -- training the N adapters one job at a time
    ours       stack the N adapters' A [r, in] / B [out, r] leaf parameters (as the model wrapper does each
               step), multi_lora_linear(..., training=True) over all rows, one backward (dx, every dA_j, dB_j);
    ours:<b>   the same with backend=<b>. The LoRABatch is built outside the timed call (once per step,
               shared across layers).
Gradients come back through torch.autograd.grad (no .grad accumulation in the timed call). Every contender's
output and gradients are checked against a float32 per-adapter autograd reference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lora_kernels.bench.bench_multi_lora import OURS, ServeCase, ServeInputs, contender_unavailable, make_case
from lora_kernels.bench.bench_multi_lora import make_inputs, multi_lora_api
from lora_kernels.bench.common import (CHECK_RTOL, Context, Unavailable, make_peft_layer, make_row, na_row,
                                       recover, rel_rms_error, score, short_error, time_group)
from lora_kernels.bench.timing import rotating_sets

SUITE = "multi_lora_train"
PHASE = "fwd+bwd"
CONTENDERS = ("base", "peft-seq") + OURS
ADAPTERS = (1, 4, 16)
# Rows of one layer per joint step: GPU at an 8B model's q projection, CPU at the small shapes of the
# multi_lora suite (32 sequences of 8 tokens, Qwen2-0.5B's q projection).
GPU_SHAPE = ("llama3-8b", "q", 16, 256, 16)   # model, proj, rank, sequences, tokens per sequence
CPU_SHAPE = ("qwen2-0.5b", "q", 16, 32, 8)


def default_cases(device: torch.device, quick: bool = False) -> list[ServeCase]:
    model, proj, r, seqs, L = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    return [make_case(model, proj, r, "prefill", seqs, L, n) for n in ADAPTERS]


def grid(models, projs, ranks, adapters, seqs, seq_len, shapes=()) -> list[ServeCase]:
    targets = [(m, p) for m in models for p in projs] + [("custom", f"{K}x{N}") for K, N in shapes]
    return [make_case(m, p, r, "prefill", seqs, seq_len, n) for m, p in targets for r in ranks for n in adapters]


def _rows_of(inp: ServeInputs) -> list[torch.Tensor]:
    """Token indices of each adapter (int64), computed once outside the timed calls."""
    ta = inp.token_adapter.long()
    return [(ta == j).nonzero().squeeze(1) for j in range(inp.A_stack.shape[0])]


def reference(inp: ServeInputs, dy: torch.Tensor) -> list[torch.Tensor]:
    """[y, dx, dA [N, r, in], dB [N, out, r]] in float32, adapter by adapter with autograd."""
    x, A, B = (t.detach().to(torch.float32, copy=True).requires_grad_() for t in (inp.x, inp.A_stack, inp.B_stack))
    y = F.linear(x, inp.weight.float(), None if inp.bias is None else inp.bias.float())
    for j, ix in enumerate(_rows_of(inp)):
        lora = (x[ix] @ A[j].T) @ B[j].T * inp.scalings[j].item()
        y = y.index_add(0, ix, lora)
    dx, dA, dB = torch.autograd.grad(y, [x, A, B], dy.float())
    return [y.detach(), dx, dA, dB]


def build(name: str, inp: ServeInputs, dy: torch.Tensor) -> tuple[Callable[[], object], Callable[[], list]]:
    """(the timed fwd+bwd call, a call returning [y, dx, dA, dB] in the reference's layout, or [] for base)."""
    W, b = inp.weight, inp.bias
    n = inp.A_stack.shape[0]
    if name == "base":
        x = inp.x.detach().requires_grad_()
        return (lambda: torch.autograd.grad(F.linear(x, W, b), x, dy)), list
    if name == "peft-seq":
        s = inp.scalings.tolist()
        rows = _rows_of(inp)
        layers = [make_peft_layer(W, b, [(f"a{j}", inp.A_stack[j], inp.B_stack[j], s[j])]).train()
                  for j in range(n)]
        xs = [inp.x[ix].detach().requires_grad_() for ix in rows]
        dys = [dy[ix] for ix in rows]
        params = [[lay.lora_A[f"a{j}"].weight, lay.lora_B[f"a{j}"].weight] for j, lay in enumerate(layers)]

        def step():
            return [(y, *torch.autograd.grad(y, [xj, *pj], dyj))
                    for lay, xj, pj, dyj in zip(layers, xs, params, dys) for y in (lay(xj),)]

        def outputs():
            parts = step()
            y = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
            dx = torch.empty(inp.x.shape, dtype=inp.x.dtype, device=dy.device)
            for ix, (yj, dxj, _, _) in zip(rows, parts):
                y[ix], dx[ix] = yj.detach(), dxj
            return [y, dx, torch.stack([p[2] for p in parts]), torch.stack([p[3] for p in parts])]
        return step, outputs
    if name in OURS:
        multi_lora_linear, LoRABatch = multi_lora_api()
        backend = name.split(":", 1)[1] if ":" in name else None
        batch = LoRABatch.from_token_adapters(inp.token_adapter, n)
        x = inp.x.detach().requires_grad_()
        As = [inp.A_stack[j].detach().requires_grad_() for j in range(n)]
        Bs = [inp.B_stack[j].detach().requires_grad_() for j in range(n)]
        s = inp.scalings

        def step():
            y = multi_lora_linear(x, W, b, torch.stack(As), torch.stack(Bs), s, batch, backend=backend,
                                  training=True)
            return (y, *torch.autograd.grad(y, [x, *As, *Bs], dy))

        def outputs():
            y, dx, *g = step()
            return [y.detach(), dx, torch.stack(g[:n]), torch.stack(g[n:])]
        return step, outputs
    raise Unavailable(f"unknown contender {name!r}")


def check(row: dict, got: list, ref: list, dtype: torch.dtype) -> None:
    """The worst relative-RMS error over y, dx, dA, dB; WRONG above CHECK_RTOL."""
    errs = {k: rel_rms_error(g, r) for k, g, r in zip(("y", "dx", "dA", "dB"), got, ref)}
    worst = max(errs, key=lambda k: errs[k])
    row["rel_err"] = errs[worst]
    if not errs[worst] <= CHECK_RTOL[dtype]:
        row["status"] = "wrong"
        row["reason"] = f"{worst} differs from the reference: relative RMS error {errs[worst]:.2e}"


def run(cases: list[ServeCase], contenders, ctx: Context) -> list[dict]:
    reasons = {c: None if c == "base" else contender_unavailable("peft-mixed" if c == "peft-seq" else c, ctx.device)
               for c in contenders}
    rows: list[dict] = []
    for case in cases:
        rows += run_case(case, contenders, ctx, reasons)
    return rows


def run_case(case: ServeCase, contenders, ctx: Context, reasons: dict) -> list[dict]:
    cd = case.as_dict()
    cd.update(dtype=str(ctx.dtype).replace("torch.", ""), adapter_dtype=str(ctx.dtype).replace("torch.", ""))
    why_not = None
    if case.d > case.seqs:
        why_not = f"{case.d} adapters need at least as many sequences (have {case.seqs})"
    elif ctx.out_of_time():
        why_not = "time budget used up"
    if why_not is None:
        try:
            first = make_inputs(case, ctx)
            gen = torch.Generator().manual_seed(1)
            dy = torch.randn(case.T, case.N, generator=gen).to(ctx.device, ctx.dtype)
        except Exception as e:  # noqa: BLE001
            recover(ctx.device)
            why_not = f"inputs: {short_error(e)}"
    if why_not is not None:
        ctx.tick(len(contenders), case.label)
        return [na_row(SUITE, PHASE, cd, c, why_not) for c in contenders]

    sets = [first] + [first.clone() for _ in range(rotating_sets(first.nbytes(), ctx.device) - 1)]
    ref = reference(first, dy) if ctx.check else None
    group_rows, calls = {}, {}
    for c in contenders:
        if reasons[c] or ctx.out_of_time():
            group_rows[c] = na_row(SUITE, PHASE, cd, c, reasons[c] or "time budget used up")
            continue
        row = make_row(SUITE, PHASE, cd, c, sets=len(sets))
        try:
            built = [build(c, s, dy) for s in sets]
            calls[c] = [step for step, _ in built]
            if ref is not None and c != "base":
                check(row, built[0][1](), ref, ctx.dtype)
        except Exception as ex:  # noqa: BLE001 - one contender failing never stops the run
            recover(ctx.device)
            calls.pop(c, None)
            row = na_row(SUITE, PHASE, cd, c, f"error: {short_error(ex)}")
        group_rows[c] = row
    # Autograd with host-side bookkeeping (PEFT's per-adapter loop, torch.stack of N parameters): eager only.
    timed = time_group(calls, ctx, {c: False for c in calls})
    rows = []
    for c in contenders:
        ctx.tick(1, case.label)
        row, t = group_rows[c], timed.timings.get(c)
        if isinstance(t, Exception):
            row = na_row(SUITE, PHASE, cd, c, f"error: {short_error(t)}")
        elif t is not None:
            score(row, t, None, ctx.peaks)
        rows.append(row)
    return rows


def goal_line(rows: list[dict]) -> str:
    """The CPU goal of issue 14: joint fwd+bwd of 4 adapters >= 1.5x faster than 4 sequential PEFT passes."""
    got = [f"{r['contender']} {r['vs_peft']:.2f}x" for r in rows
           if r["suite"] == SUITE and r.get("adapters") == 4 and r.get("vs_peft") and r["contender"] in OURS]
    return "joint 4 adapters vs 4 sequential PEFT passes (goal >= 1.5x on CPU): " + (", ".join(got) or "n/a")
