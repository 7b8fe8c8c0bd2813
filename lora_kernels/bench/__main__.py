"""The benchmark CLI: `make bench` / `python -m bench` in a checkout; `python -m lora_kernels bench` (--quick),
`python -m lora_kernels.bench` or `lora-kernels-bench` from an installed package.

Runs the chosen suites on the present device (CUDA when available, else small CPU shapes with the CPU
backends), prints tables, and writes results.json, table.md / table.txt and speedup.png into a new
folder <out>/<UTC time stamp>/, with <out>/latest pointing at the newest run.
Examples:
    python -m bench                          # everything, default grid for this device
    python -m bench --quick                  # the headline cases (README / RESULTS.md), small CPU versions on a CPU
    python -m bench --suite overhead         # per-call host overhead on a tiny layer
    python -m bench --suite dora             # DoRA vs PEFT's DoRA and our LoRA, against the floor (issue 20)
    python -m bench --suite vllm             # vLLM end to end: its own LoRA backend vs lora_kernels' (minutes)
    python -m bench --suite lora_linear --models llama3-8b --projs q,down --ranks 16 --tokens 1,8192
    python -m bench --floors                 # FLOPs, bytes and roofline floor of the headline cases
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

import torch

from lora_kernels.bench import bench_dora as dora_suite
from lora_kernels.bench import bench_lora_linear as single
from lora_kernels.bench import bench_multi_lora as multi
from lora_kernels.bench import bench_multi_lora_train as train
from lora_kernels.bench import bench_overhead as overhead
from lora_kernels.bench import bench_qlora as qlora_suite
from lora_kernels.bench import bench_vllm as vllm_suite
from lora_kernels.bench.common import DTYPES, Context, dtype_name
from lora_kernels.bench.report import (Progress, add_ratios, busy_note, is_busy, machine_info, machine_line,
                                       print_tables, summary, write_outputs)
from lora_kernels.bench.roofline import MODELS, floor_table
from lora_kernels.bench.timing import measure_peaks

# Outside a checkout the outputs go to the current directory (a checkout's `make bench` passes bench/out).
DEFAULT_OUT = "lora_kernels_bench"
SUITES = (single.SUITE, multi.SUITE, train.SUITE, overhead.SUITE, vllm_suite.SUITE, qlora_suite.SUITE,
          dora_suite.SUITE)
GPU_LINE = ("No CUDA device: ran small CPU shapes with the CPU backends. GPU figures (Triton / native "
            "kernels, CUDA-event timing, peak memory) need a GPU: run `make bench` on a CUDA machine.")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _strs(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _shape(s: str) -> tuple[int, int]:
    try:
        k, n = s.lower().split("x")
        return int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants INxOUT, e.g. 4096x1024, got {s!r}")


def parser(prog: str = "python -m lora_kernels.bench", default_out: str = DEFAULT_OUT) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("all",) + SUITES, default="all")
    p.add_argument("--quick", action="store_true",
                   help="only the headline cases (small CPU versions of them without a GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="x / W0 dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--adapter-dtype", choices=("fp32", "same"), default="fp32",
                   help="lora_linear adapters: fp32 (PEFT's default for training) or x's dtype")
    p.add_argument("--models", type=_strs, help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--projs", type=_strs, help="comma list of q,k,v,o,gate,up,down")
    p.add_argument("--shape", type=_shape, action="append", default=[], help="extra projection INxOUT (repeatable)")
    p.add_argument("--ranks", type=_ints, help="comma list, e.g. 8,16,64")
    p.add_argument("--tokens", type=_ints, help="lora_linear token counts, e.g. 1,16,128,1024,8192")
    p.add_argument("--adapters", type=_ints, help="multi_lora distinct adapters, e.g. 1,8,64,256")
    p.add_argument("--decode-seqs", type=int, default=None)
    p.add_argument("--prefill-seqs", type=int, default=None)
    p.add_argument("--prefill-len", type=int, default=None)
    p.add_argument("--contenders", type=_strs, help="comma list (default: all of the suite's)")
    p.add_argument("--phases", type=_strs, default=list(single.PHASES), help="lora_linear: fwd,fwd+bwd,memory")
    p.add_argument("--dropouts", type=_floats, default=list(single.DROPOUTS),
                   help="lora_linear fwd+bwd dropout probabilities (default 0,0.1)")
    p.add_argument("--graph", choices=("auto", "always", "never"), default="auto",
                   help="CUDA-graph timing: auto = for launch-bound cases (base GEMM under 0.1 ms)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the run (default: torch's, %d here, or 1 when other work keeps the machine "
                        "busier than it has cores: then a preempted worker thread stalls every parallel op)"
                        % torch.get_num_threads())
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time spent measuring each row (default 200 on a GPU, 100 on a CPU)")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds; rows not reached by then are reported n/a and the outputs still written")
    p.add_argument("--no-check", action="store_true", help="skip the forward check against the reference")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-peaks", action="store_true", help="skip measuring the device's peaks (no %% peak)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=default_out,
                   help=f"output folder; each run writes OUT/<time stamp>/ and OUT/latest points at it "
                        f"(default {default_out})")
    p.add_argument("--floors", action="store_true", help="print FLOPs / bytes / floor of the headline cases and exit")
    return p


def _custom(args) -> bool:
    return any(v for v in (args.models, args.projs, args.ranks, args.tokens, args.adapters, args.shape,
                           args.decode_seqs, args.prefill_seqs, args.prefill_len))


def single_cases(args, device) -> list:
    if not _custom(args):
        return single.default_cases(device, args.quick)
    gpu = device.type == "cuda"
    models = args.models if args.models is not None else ([] if args.shape else
                                                           (["llama3-8b", "qwen2-0.5b"] if gpu else ["qwen2-0.5b"]))
    projs = args.projs or (["q", "k", "o", "gate", "down"] if gpu else ["q"])
    ranks = args.ranks or ([8, 16, 64] if gpu else [16])
    tokens = args.tokens or (list(single.TOKENS) if gpu else [1, 16, 128])
    return single.grid(models, projs, ranks, tokens, args.shape)


def multi_cases(args, device) -> list:
    if not _custom(args):
        return multi.default_cases(device, args.quick)
    gpu = device.type == "cuda"
    models = args.models if args.models is not None else ([] if args.shape else
                                                           (["llama3-8b"] if gpu else ["qwen2-0.5b"]))
    projs = args.projs or ["q"]
    ranks = args.ranks or [16]
    adapters = args.adapters or (list(multi.ADAPTERS) if gpu else [1, 8, 32])
    seqs = args.decode_seqs or (multi.DECODE_SEQS if gpu else 32)
    pseqs = args.prefill_seqs or (multi.PREFILL_SEQS if gpu else 32)
    plen = args.prefill_len or (multi.PREFILL_LEN if gpu else 8)
    cases = []
    for r in ranks:
        cases += multi.grid(models, projs, r, adapters, seqs, pseqs, plen, shapes=args.shape)
    return cases


def train_cases(args, device) -> list:
    if not _custom(args):
        return train.default_cases(device, args.quick)
    model, proj, r, seqs, seq_len = train.GPU_SHAPE if device.type == "cuda" else train.CPU_SHAPE
    models = args.models if args.models is not None else ([] if args.shape else [model])
    return train.grid(models, args.projs or [proj], args.ranks or [r], args.adapters or list(train.ADAPTERS),
                      args.prefill_seqs or seqs, args.prefill_len or seq_len, shapes=args.shape)


def _validate(names, allowed, what):
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")


def main(argv: list[str] | None = None, prog: str = "python -m lora_kernels.bench",
         default_out: str = DEFAULT_OUT) -> int:
    args = parser(prog, default_out).parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; Triton kernels run in the interpreter and are not timed.",
              file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    adapter_dtype = torch.float32 if args.adapter_dtype == "fp32" else dtype
    if args.models:
        _validate(args.models, MODELS, "model")
    if args.projs:
        _validate(args.projs, MODELS["llama3-8b"], "projection")
    _validate(args.phases, single.PHASES, "phase")
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        raise SystemExit(f"--dropouts must lie in [0, 1), got {args.dropouts}")

    if args.floors:
        peaks = measure_peaks(device, dtype) if gpu else {}
        print("Roofline floors of the headline cases (FLOPs / bytes formulas in lora_kernels/bench/roofline.py)"
              + (f"; measured peaks {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s, "
                 f"{peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s" if peaks else "; no GPU: no floor times"))
        for row in floor_table(single.HEADLINE, multi.HEADLINE, peaks.get("matmul_flops"),
                               peaks.get("copy_bytes_per_s")):
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{v}" for k, v in row.items()))
        return 0

    threads = torch.get_num_threads()
    # On a CPU shared with more work than it has cores, a parallel op waits for whichever worker thread
    # another process preempted: 2-thread runs of the CPU grid took 3-4x as long as 1-thread runs and
    # scattered far more (2-core machine, load average ~7). Unless told otherwise, time with one thread there.
    auto_threads = args.threads is None and not gpu and threads > 1 and is_busy()
    if auto_threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, gpu, dtype, adapter_dtype, prog, argv, auto_threads)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, gpu, dtype, adapter_dtype, prog, argv, auto_threads=False) -> int:
    t_start = time.monotonic()
    info = machine_info(device)
    print(machine_line(info), flush=True)
    busy = None if gpu else busy_note(info, auto_threads)
    if not gpu:
        print(GPU_LINE, flush=True)
        if busy:
            print(busy, flush=True)

    # The vllm suite starts three vLLM engines and takes minutes: not part of --quick.
    suites = [s for s in SUITES if not (args.quick and s == vllm_suite.SUITE)] if args.suite == "all" else [args.suite]
    plan = []
    if single.SUITE in suites:
        contenders = _contenders(args, single.CONTENDERS, single.SUITE)
        cases = single_cases(args, device)
        mem_cases = None
        if "memory" in args.phases and cases:
            biggest = max(c.M for c in cases)  # memory matters where activations are large
            mem_cases = {c for c in cases if c.M == biggest}
        n_jobs = sum(single.jobs_per_case(contenders, [p for p in args.phases if p != "memory" or c in mem_cases],
                                          args.dropouts) for c in cases)
        plan.append((single.SUITE, cases, contenders, mem_cases, n_jobs))
    if multi.SUITE in suites:
        contenders = _contenders(args, multi.CONTENDERS, multi.SUITE)
        cases = multi_cases(args, device)
        plan.append((multi.SUITE, cases, contenders, None, len(cases) * len(contenders)))
    if train.SUITE in suites:
        contenders = _contenders(args, train.CONTENDERS, train.SUITE)
        cases = train_cases(args, device)
        plan.append((train.SUITE, cases, contenders, None, len(cases) * len(contenders)))
    if overhead.SUITE in suites:
        names = overhead.contenders(device)
        contenders = _contenders(args, names, overhead.SUITE) if args.suite == overhead.SUITE else names
        plan.append((overhead.SUITE, None, contenders, None, len(contenders) * len(overhead.PHASES)))
    if qlora_suite.SUITE in suites and not (args.suite == "all" and _custom(args)):  # fixed shapes: not with custom ones
        contenders = _contenders(args, qlora_suite.CONTENDERS, qlora_suite.SUITE)
        plan.append((qlora_suite.SUITE, None, contenders, None, len(contenders) * len(qlora_suite.cases()) + 1))
    if dora_suite.SUITE in suites and not (args.suite == "all" and _custom(args)):  # fixed shapes, as qlora's
        contenders = _contenders(args, dora_suite.CONTENDERS, dora_suite.SUITE)
        n_train = sum(c[-1] == "fwd+bwd" for c in dora_suite.cases())
        plan.append((dora_suite.SUITE, None, contenders, None, len(contenders) * len(dora_suite.cases()) + n_train))
    if vllm_suite.SUITE in suites and not (args.suite == "all" and _custom(args)):  # fixed model, as qlora's
        contenders = _contenders(args, vllm_suite.CONTENDERS, vllm_suite.SUITE)
        plan.append((vllm_suite.SUITE, None, contenders, None, len(contenders) * len(vllm_suite.PHASES)))

    ctx = Context(device=device, dtype=dtype, adapter_dtype=adapter_dtype,
                  budget_ms=args.budget_ms or (200.0 if gpu else 100.0), graph=args.graph if gpu else "never",
                  check=not args.no_check, deadline=t_start + args.time_budget, dropouts=tuple(args.dropouts))
    if not args.no_peaks:
        print("measuring the device's peaks ...", flush=True)
        ctx.peaks = measure_peaks(device, dtype)
        print(f"  {ctx.peaks['matmul_flops'] / 1e12:.2f} TFLOP/s ({ctx.peaks['matmul']});  "
              f"{ctx.peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s ({ctx.peaks['copy']})", flush=True)

    ctx.progress = Progress(sum(p[-1] for p in plan), enabled=not args.no_progress)
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    try:
        for suite, cases, contenders, mem_cases, _ in plan:
            t_suite = time.monotonic()
            if suite == single.SUITE:
                rows += single.run(cases, contenders, args.phases, ctx, mem_cases)
            elif suite == multi.SUITE:
                rows += multi.run(cases, contenders, ctx)
            elif suite == train.SUITE:
                rows += train.run(cases, contenders, ctx)
            elif suite == vllm_suite.SUITE:
                rows += vllm_suite.run(ctx, contenders, quick=args.quick)
            elif suite == qlora_suite.SUITE:
                rows += qlora_suite.run(ctx, contenders)
            elif suite == dora_suite.SUITE:
                rows += dora_suite.run(ctx, contenders)
            else:
                rows += overhead.run(ctx, contenders)
            seconds[suite] = round(time.monotonic() - t_suite, 1)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the rows measured so far", file=sys.stderr)
    finally:
        ctx.progress.close()

    add_ratios(rows)
    print_tables(rows, ctx.peaks)
    if any(r.get("suite") == qlora_suite.SUITE for r in rows):
        print("\n" + qlora_suite.table(rows) + "\n" + "\n".join("  " + ln for ln in qlora_suite.goal_lines(rows)))
    if any(r.get("suite") == dora_suite.SUITE for r in rows):
        print("\n" + dora_suite.table(rows) + "\n" + "\n".join("  " + ln for ln in dora_suite.goal_lines(rows)))
    lines = summary(rows)
    if lines:
        print("\nSummary (geometric means):")
        for ln in lines:
            print("  " + ln)
    meta = {
        "machine": info,
        "peaks": ctx.peaks,
        "command": prog + " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {"dtype": dtype_name(dtype), "adapter_dtype": dtype_name(adapter_dtype),
                     "budget_ms": ctx.budget_ms, "graph": ctx.graph, "check": ctx.check,
                     "dropouts": list(ctx.dropouts), "quick": args.quick},
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "suite_seconds": seconds,
        "formulas": "lora_kernels/bench/roofline.py",
    }
    paths = write_outputs(rows, meta, os.path.abspath(args.out), plot=not args.no_plot)
    files = ", ".join(os.path.basename(v) for k, v in paths.items() if k not in ("dir", "latest"))
    print(f"\noutputs: {paths['dir']}/ ({files})\nlatest run: {paths['latest']}")
    if not gpu:
        print(GPU_LINE)
        if busy:
            print(busy)
    print(f"done in {time.monotonic() - t_start:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + ")")
    n_wrong = sum(r.get("status") == "wrong" for r in rows)
    if n_wrong:
        print(f"{n_wrong} row(s) disagree with the reference: see the WRONG notes above", file=sys.stderr)
        return 1
    return 0


def _contenders(args, allowed, suite) -> list[str]:
    """--contenders for one suite: with --suite all, the names the suite does not know are ignored."""
    if not args.contenders:
        return list(allowed)
    names = [c for c in args.contenders if c in allowed] if args.suite == "all" else args.contenders
    _validate(names, allowed, f"{suite} contender")
    return names


if __name__ == "__main__":
    sys.exit(main())
