"""Static performance evidence without a GPU: `python -m lora_kernels.kernels.aot_check --report FILE.json`.

Compiles, for sm_80 and sm_90, every launch of the headline cases (`report_launches()` of each kernel
family in kernels/aot_cases.py: the configs the launchers pick for Llama-3-8B shapes) through aot_check's
compile path, and writes one JSON row per (case, launch, GPU) with what the cubin and the PTX say:

* `regs`, `spill_bytes`, `smem_bytes`, and `ctas_per_sm` from those against the SM's limits;
* `grid_ctas` and `waves` = grid / (SMs x ctas_per_sm) on an A100 (sm_80, 108 SMs) / H100 (sm_90, 132 SMs);
* `mma`: HGMMA / HMMA / FFMA instructions in the SASS (static counts, not executed ones); `fences`: the
  MEMBAR instructions by scope;
* `atomics`: atomic instructions in the PTX by operation and memory semantics (`red.relaxed`, `atom.acq_rel`).

It counts instructions and occupancy, never time: a GPU decides speed (lora_kernels.dispatch measures).
Identical compiles across cases run once; Triton's cache makes a second run fast. `render_markdown`
turns a report into the table in bench/README.md.
"""
from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ..dispatch import write_atomic

CCS = (80, 90)


@dataclass(frozen=True)
class SM:
    """Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table) and the SM count of the GPU
    the report assumes for the architecture."""
    gpu: str
    sms: int
    smem_per_sm: int                 # bytes of shared memory an SM can give to CTAs
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256        # registers are allocated per warp in units of 256
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    smem_reserved_per_cta: int = 1024  # the driver reserves 1 KB of shared memory per CTA


SM_LIMITS = {80: SM("A100", 108, 164 * 1024), 90: SM("H100 SXM", 132, 228 * 1024)}


def ctas_per_sm(regs: int, smem: int, num_warps: int, cc: int) -> int:
    """Resident CTAs per SM, limited by registers, shared memory, threads and the CTA slots."""
    sm = SM_LIMITS[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / sm.reg_alloc_unit) * sm.reg_alloc_unit
    by_regs = (sm.regs_per_sm // regs_per_warp) // num_warps
    by_smem = sm.smem_per_sm // (smem + sm.smem_reserved_per_cta)
    by_threads = sm.max_threads_per_sm // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, sm.max_ctas_per_sm)


_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red)((?:\.\w+)+)", re.M)
_SEMANTICS = ("relaxed", "acquire", "release", "acq_rel", "sc")
MMA_OPS = ("HGMMA", "HMMA", "FFMA")


def sass_opcodes(sass: str) -> Counter:
    """Opcode with its modifiers (`MEMBAR.ALL.GPU`) -> static count, from `cuobjdump -sass` output."""
    return Counter(m.group(1) for m in _SASS_OP.finditer(sass))


def ptx_atomics(ptx: str) -> dict:
    """{"red.relaxed": n, "atom.acq_rel": n, ...}: atomic instructions by memory semantics. PTX assumes
    .relaxed when an atom/red names none."""
    out = Counter()
    for op, quals in _PTX_ATOMIC.findall(ptx):
        sem = next((q for q in quals.split(".") if q in _SEMANTICS), "relaxed")
        out[f"{op}.{sem}"] += 1
    return dict(sorted(out.items()))


def analyse(compiled) -> dict:
    """The per-compile fields of a report row."""
    from lora_kernels.kernels._launch import cuobjdump, resource_usage

    usage = resource_usage(compiled)
    ops = sass_opcodes(cuobjdump(compiled, "-sass"))
    base = Counter()
    for op, n in ops.items():
        base[op.split(".")[0]] += n
    # Fences by scope: MEMBAR.ALL.CTA comes with wgmma's shared-memory proxy fence; .GPU ones came with
    # acquire-release atomics.
    fences = {op: n for op, n in sorted(ops.items()) if op.startswith("MEMBAR")}
    return {"regs": usage["registers"], "spill_bytes": usage["stack"], "smem_bytes": usage["shared"],
            "mma": {k: base.get(k, 0) for k in MMA_OPS}, "fences": fences,
            "atomics": ptx_atomics(compiled.asm["ptx"])}


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

def _ci_case(case: str) -> bool:
    """The subset tests/test_aot.py compiles (a few minutes on 2 cores with a cold Triton cache): one
    layer shape and rank, every GEMM tile class, both adapter dtypes, with dropout; multi-adapter at a
    prefill and a decode-ish size, plain and with DoRA's column scale; the fused 4-bit GEMM at a decode-ish and a prefill size, and its dequant;
    DoRA's fused forward and backward at those sizes, with and without dropout."""
    if case.startswith("lora_linear "):
        return (" 4096->4096 r=16" in case and "p=0.1" in case
                and any(f" M={m} " in case for m in (16, 128, 1024)))
    if case.startswith("multi_lora_linear"):
        return ("[fused]" in case or "[fused,col_scale]" in case) and any(f" T={t} " in case for t in (64, 256))
    if case.startswith(("qlora_linear fwd fused", "qlora_linear bwd fused")):
        return " 4096->4096 r=16" in case and any(f" M={m} " in case for m in (16, 128))
    if case.startswith("qlora_linear dequant"):
        return " 4096->4096" in case
    if case.startswith("dora_linear "):
        return any(f" M={m} " in case for m in (16, 128))
    return False


SUBSETS = {"all": lambda case: True, "ci": _ci_case}


@functools.lru_cache(maxsize=None)
def report_cases(subset: str = "all") -> tuple:
    """((case, Launch), ...) of every kernel family's report cases in the subset, and the families that
    have none at all."""
    from lora_kernels.kernels import aot_cases

    cases, missing = [], []
    for family in aot_cases.FAMILIES:
        family_cases = list(aot_cases.report_launches(family))
        if not family_cases:
            missing.append(family)
        cases += [(c, l) for c, l in family_cases if SUBSETS[subset](c)]
    return tuple(cases), tuple(missing)


def compile_key(launch) -> str:
    """Launches with equal keys compile to the same binary."""
    from lora_kernels.kernels._launch import _jit_specialization

    sig, consts, attrs = _jit_specialization(launch)
    return repr((launch.kernel_name(), sorted(sig.items()), sorted((k, repr(v)) for k, v in consts.items()),
                 sorted(attrs.items()), launch.num_warps, launch.num_stages))


def _compile_job(job):
    subset, index, cc = job
    from lora_kernels.kernels._launch import aot_compile

    launch = report_cases(subset)[0][index][1]
    try:
        return analyse(aot_compile(launch, cc))
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def _dims(launch) -> dict:
    return {k: v for k, v in launch.args.items() if k in ("M", "N", "K", "R", "T") and isinstance(v, int)}


def build_report(subset: str = "all", workers: int = 2) -> dict:
    import torch
    import triton

    cases, missing = report_cases(subset)
    first = {}  # compile key -> index of its first case
    keys = []
    for i, (_, launch) in enumerate(cases):
        keys.append(compile_key(launch))
        first.setdefault(keys[-1], i)
    jobs = [(subset, i, cc) for i in first.values() for cc in CCS]
    with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        results = dict(zip(((keys[i], cc) for _, i, cc in jobs), pool.map(_compile_job, jobs)))
    rows = []
    for (case, launch), key in zip(cases, keys):
        for cc in CCS:
            res = results[(key, cc)]
            grid = math.prod(launch.grid)
            row = {"kernel": launch.kernel_name(), "case": case, "cc": cc, "config": launch.describe(),
                   "grid_ctas": grid, "dims": _dims(launch), "num_warps": launch.num_warps, **res}
            if "error" not in res:
                occ = ctas_per_sm(res["regs"], res["smem_bytes"], launch.num_warps, cc)
                row["ctas_per_sm"] = occ
                row["waves"] = round(grid / (SM_LIMITS[cc].sms * occ), 3) if occ else None
            rows.append(row)
    return {"triton": triton.__version__, "torch": torch.__version__, "subset": subset,
            "gpus": {str(cc): SM_LIMITS[cc].__dict__ for cc in CCS}, "missing": list(missing),
            "distinct_compiles": len(jobs), "rows": rows}


def write_report(path: str, subset: str = "all", workers: int = 2) -> dict:
    report = build_report(subset, workers)
    write_atomic(path, json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

def _short_config(config: str) -> str:
    keep = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "warps", "stages", "HAS_DROPOUT", "ATOMIC", "DS_ATOMIC",
            "DB_ATOMIC", "COMPUTE_DS", "NUM_SLICES")
    parts = re.findall(r"(\w+)=([^,\]]+)", config)
    return " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in parts if k in keep)


def render_markdown(report: dict, case_filter=None) -> str:
    """A markdown table of a report (one row per case and kernel, sm_80 and sm_90 side by side)."""
    head = ("| case | kernel | config | CTAs | regs 80/90 | spill | smem KB 90 | CTAs/SM 80/90 | waves A100/H100 "
            "| HGMMA/HMMA/FFMA (sm_90) | atomics (PTX) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {}
    for r in report["rows"]:
        if case_filter is None or case_filter(r["case"]):
            by.setdefault((r["case"], r["config"]), {})[r["cc"]] = r
    for (case, config), ccs in by.items():
        a, h = ccs.get(80, {}), ccs.get(90, {})
        mma = h.get("mma", {})
        atomics = ", ".join(f"{k} {v}" for k, v in h.get("atomics", {}).items()) or "-"
        lines.append(
            f"| {case} | {h.get('kernel', a.get('kernel'))} | {_short_config(config)} | {h.get('grid_ctas')} "
            f"| {a.get('regs')}/{h.get('regs')} | {max(a.get('spill_bytes', 0), h.get('spill_bytes', 0))} "
            f"| {round(h.get('smem_bytes', 0) / 1024)} | {a.get('ctas_per_sm')}/{h.get('ctas_per_sm')} "
            f"| {a.get('waves')}/{h.get('waves')} | {mma.get('HGMMA')}/{mma.get('HMMA')}/{mma.get('FFMA')} "
            f"| {atomics} |")
    return "\n".join(lines)


def _by_case_kernel(report: dict, cc: int, case_filter) -> dict:
    out = {}
    for r in report["rows"]:
        if r["cc"] == cc and (case_filter is None or case_filter(r["case"])):
            out.setdefault((r["case"], r["kernel"]), r)  # a case's first launch of each kernel
    return out


def compare_markdown(before: dict, after: dict, case_filter=None, cc: int = 90) -> str:
    """Before -> after of the kernels two reports share by (case, kernel), on one GPU."""
    b, a = _by_case_kernel(before, cc, case_filter), _by_case_kernel(after, cc, case_filter)
    gpu = SM_LIMITS[cc].gpu
    lines = [f"| case | kernel | grid CTAs | waves ({gpu}) | regs | CTAs/SM | spill B | atomics (PTX) | HGMMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    arrow = lambda k, f=str: f"{f(b[key].get(k))} → {f(a[key].get(k))}" if key in b else f"new: {f(a[key].get(k))}"  # noqa: E731
    fmt_atomics = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "none"  # noqa: E731
    for key in a:
        lines.append(f"| {key[0]} | {key[1]} | {arrow('grid_ctas')} | {arrow('waves')} | {arrow('regs')} "
                     f"| {arrow('ctas_per_sm')} | {arrow('spill_bytes')} | {arrow('atomics', fmt_atomics)} "
                     f"| {arrow('mma', lambda m: m['HGMMA'])} |")
    return "\n".join(lines)


def main(argv) -> int:
    """--report FILE.json [--subset all|ci] [--workers N] [--markdown]; exit 1 if a kernel failed to compile."""
    path = argv[argv.index("--report") + 1]
    subset = argv[argv.index("--subset") + 1] if "--subset" in argv else "all"
    workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 2
    report = write_report(path, subset, workers)
    failed = [r for r in report["rows"] if "error" in r]
    print(f"{len(report['rows'])} rows, {report['distinct_compiles']} distinct compiles (triton "
          f"{report['triton']}) -> {path}", file=sys.stderr)
    for m in report["missing"]:
        print(f"no report cases for the {m} kernels (kernels/aot_cases.py)", file=sys.stderr)
    for r in failed:
        print(f"FAIL sm_{r['cc']} {r['config']} ({r['case']}): {r['error']}", file=sys.stderr)
    if "--markdown" in argv:
        print(render_markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    # python -m lora_kernels.kernels.static_report AFTER.json [BEFORE.json] [--grep TEXT]...: markdown tables
    args = sys.argv[1:]
    greps = [args[i + 1] for i, a in enumerate(args) if a == "--grep"]
    files = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--grep")]
    keep = (lambda case: all(g in case for g in greps)) if greps else None
    reports = [json.load(open(f)) for f in files]
    print(render_markdown(reports[0], keep) if len(reports) == 1 else compare_markdown(reports[1], reports[0], keep))
