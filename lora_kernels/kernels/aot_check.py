"""Compile every shipped Triton kernel config for sm_80 and sm_90 on this machine (no GPU needed) and
report registers, spill stack and shared memory: `python -m lora_kernels.kernels.aot_check [--json]`.

Runs without TRITON_INTERPRET (compilation needs real JIT functions). Exit status 1 when a config fails
to compile, spills registers, or needs more shared memory than the GPU has.

`--report FILE.json [--subset all|ci] [--markdown]` writes the static report of the headline cases
instead (occupancy, waves, MMA instructions, atomics by semantics: see static_report.py).

Another Triton, without touching the environment: `pip install --no-deps --target DIR triton==X` and
`PYTHONPATH=DIR python -m lora_kernels.kernels.aot_check` (the first line printed names the Triton in use;
scripts/aot_check_triton.sh does both).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

CCS = (80, 90)


def _launches():
    """(family, index, Launch) of every config of every kernel family (kernels/aot_cases.py)."""
    from lora_kernels.kernels import aot_cases

    for family in aot_cases.FAMILIES:
        yield from ((family, i, launch) for i, launch in enumerate(aot_cases.aot_launches(family)))


def _compile_one(job):
    family, index, cc = job
    from lora_kernels.kernels import aot_cases
    from lora_kernels.kernels._launch import MAX_SHARED, aot_compile, resource_usage
    launch = next(itertools.islice(aot_cases.aot_launches(family), index, None))
    row = {"kernel": launch.describe(), "cc": cc,
           "signature": {k: v for k, v in launch.signature().items() if v.startswith("*")}}
    try:
        usage = resource_usage(aot_compile(launch, cc))
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        return row
    row.update(usage)
    problems = []
    if usage["stack"] > 0:
        problems.append(f"spills {usage['stack']} B to the stack")
    if usage["shared"] > MAX_SHARED[cc]:
        problems.append(f"shared memory {usage['shared']} B > {MAX_SHARED[cc]} B")
    row.update(ok=not problems, error="; ".join(problems))
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the AOT check compiles real kernels")
    import triton
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}", file=sys.stderr)
    if "--report" in argv:
        from lora_kernels.kernels import static_report
        return static_report.main(argv)
    jobs = [(m, i, cc) for m, i, _ in _launches() for cc in CCS]
    workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 2
    with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        rows = list(pool.map(_compile_one, jobs))
    for r in rows:
        if "--json" in argv:
            print(json.dumps(r))
        else:
            status = "ok  " if r["ok"] else "FAIL"
            usage = f"regs={r.get('registers')} stack={r.get('stack')} smem={r.get('shared')}"
            print(f"{status} sm_{r['cc']} {r['kernel']} {r['signature']} {usage} {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
