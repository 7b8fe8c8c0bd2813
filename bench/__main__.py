"""`python -m bench` / `lora-kernels-bench` / `make bench`: the benchmark CLI.

Runs the chosen suites on the present device (CUDA when available, else small CPU shapes with the CPU
backends), prints a table, and writes results.json, table.md / table.txt and speedup.png under --out.
Examples:
    python -m bench                          # everything, default grid for this device
    python -m bench --quick                  # the headline cases (README / RESULTS.md)
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

from bench import bench_lora_linear as single
from bench import bench_multi_lora as multi
from bench.common import DTYPES, Context, dtype_name
from bench.report import (Progress, add_ratios, machine_info, machine_line, print_tables, summary,
                          write_outputs)
from bench.roofline import MODELS, floor_table
from bench.timing import measure_peaks

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
GPU_LINE = ("No CUDA device: ran small CPU shapes with the CPU backends. GPU figures (Triton / native "
            "kernels, CUDA-event timing, peak memory) need a GPU: run `make bench` on a CUDA machine.")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _strs(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _shape(s: str) -> tuple[int, int]:
    try:
        k, n = s.lower().split("x")
        return int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants INxOUT, e.g. 4096x1024, got {s!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("all", single.SUITE, multi.SUITE), default="all")
    p.add_argument("--quick", action="store_true", help="only the headline cases")
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
    p.add_argument("--graph", choices=("auto", "always", "never"), default="auto",
                   help="CUDA-graph timing: auto = for launch-bound cases (base GEMM under 0.1 ms)")
    p.add_argument("--budget-ms", type=float, default=None, help="time spent measuring each row")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds; rows not reached by then are reported n/a and the outputs still written")
    p.add_argument("--no-check", action="store_true", help="skip the forward check against the reference")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-peaks", action="store_true", help="skip measuring the device's peaks (no %% peak)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/out)")
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


def _validate(names, allowed, what):
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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

    if args.floors:
        peaks = measure_peaks(device, dtype) if gpu else {}
        print(f"Roofline floors of the headline cases (FLOPs / bytes formulas in bench/roofline.py)"
              + (f"; measured peaks {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s, "
                 f"{peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s" if peaks else "; no GPU: no floor times"))
        for row in floor_table(peaks.get("matmul_flops"), peaks.get("copy_bytes_per_s")):
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{v}" for k, v in row.items()))
        return 0

    t_start = time.monotonic()
    info = machine_info(device)
    print(machine_line(info), flush=True)
    if not gpu:
        print(GPU_LINE, flush=True)

    suites = [single.SUITE, multi.SUITE] if args.suite == "all" else [args.suite]
    plan = []
    if single.SUITE in suites:
        contenders = args.contenders or list(single.CONTENDERS)
        contenders = [c for c in contenders if c in single.CONTENDERS] if args.suite == "all" else contenders
        _validate(contenders, single.CONTENDERS, f"{single.SUITE} contender")
        cases = single_cases(args, device)
        mem_cases = None
        if "memory" in args.phases and cases:
            biggest = max(c.M for c in cases)  # memory matters where activations are large
            mem_cases = {c for c in cases if c.M == biggest}
        n_jobs = sum(single.jobs_per_case(contenders, [p for p in args.phases
                                                       if p != "memory" or c in mem_cases]) for c in cases)
        plan.append((single.SUITE, cases, contenders, mem_cases, n_jobs))
    if multi.SUITE in suites:
        contenders = args.contenders or list(multi.CONTENDERS)
        contenders = [c for c in contenders if c in multi.CONTENDERS] if args.suite == "all" else contenders
        _validate(contenders, multi.CONTENDERS, f"{multi.SUITE} contender")
        cases = multi_cases(args, device)
        plan.append((multi.SUITE, cases, contenders, None, len(cases) * len(contenders)))

    ctx = Context(device=device, dtype=dtype, adapter_dtype=adapter_dtype,
                  budget_ms=args.budget_ms or (200.0 if gpu else 20.0), graph=args.graph if gpu else "never",
                  check=not args.no_check, deadline=t_start + args.time_budget)
    if not args.no_peaks:
        print("measuring the device's peaks ...", flush=True)
        ctx.peaks = measure_peaks(device, dtype)
        print(f"  {ctx.peaks['matmul']}: {ctx.peaks['matmul_flops'] / 1e12:.1f} TFLOP/s;  "
              f"{ctx.peaks['copy']}: {ctx.peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)

    ctx.progress = Progress(sum(p[-1] for p in plan), enabled=not args.no_progress)
    rows: list[dict] = []
    try:
        for suite, cases, contenders, mem_cases, _ in plan:
            if suite == single.SUITE:
                rows += single.run(cases, contenders, args.phases, ctx, mem_cases)
            else:
                rows += multi.run(cases, contenders, ctx)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the rows measured so far", file=sys.stderr)
    finally:
        ctx.progress.close()

    add_ratios(rows)
    print_tables(rows)
    lines = summary(rows)
    if lines:
        print("\nSummary (geometric means):")
        for ln in lines:
            print("  " + ln)
    meta = {
        "machine": info,
        "peaks": ctx.peaks,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {"dtype": dtype_name(dtype), "adapter_dtype": dtype_name(adapter_dtype),
                     "budget_ms": ctx.budget_ms, "graph": ctx.graph, "check": ctx.check},
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "formulas": "bench/roofline.py",
    }
    paths = write_outputs(rows, meta, args.out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(paths.values()))
    if not gpu:
        print(GPU_LINE)
    print(f"done in {time.monotonic() - t_start:.0f} s")
    n_wrong = sum(r.get("status") == "wrong" for r in rows)
    if n_wrong:
        print(f"{n_wrong} row(s) disagree with the reference: see the WRONG notes above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
