#!/usr/bin/env bash
# One-command verification on a CUDA machine, in under 9 minutes, with no network:
#   1. build the C++/CUDA extension lora_kernels._C for the local GPU only (a failed build is reported and
#      the other backends are still checked);
#   2. `python -m lora_kernels selftest`: every backend against the float64 reference on the GPU (seconds);
#   3. run the GPU-marked tests (`pytest -m gpu`: every backend against the reference on real CUDA, a
#      > 2^31-element case, CUDA-graph capture of a decode step);
#   4. run the benchmark's headline cases (`python -m bench --quick`).
# Logs, JUnit XML, the benchmark's JSON / tables / plot and a summary go to OUTDIR; the summary table is
# printed last.
#
# What it needs: an NVIDIA GPU with its driver; a Python environment with a CUDA build of torch, triton,
# peft, transformers and pytest -- what `make install TORCH=torch` puts into .venv on a CUDA machine (PyPI's
# Linux torch wheel is a CUDA build); nvcc (CUDA_HOME) to build the extension, else step 1 fails and the
# native backend is reported unavailable while everything else is still checked.
#
# usage: scripts/gpu_check.sh OUTDIR
#   PYTHON=...                 interpreter to use (default: this checkout's .venv/bin/python, else python3)
#   LORA_KERNELS_COMMIT=<sha>  commit recorded in the results when this copy has no .git
#   GPU_CHECK_SECONDS=510      total time budget; each step's time limit is cut from what is left
#   GPU_CHECK_SKIP_BUILD=1     keep whatever extension is there (re-runs)
#   GPU_CHECK_ALLOW_CPU=1      go on without a GPU (only to try this script itself: GPU tests skip)
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$REPO"

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-510}))
left() { echo $((DEADLINE - $(date +%s))); }
# min(cap, time left - reserve), at least 30 s
limit() { local cap=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ "$l" -gt "$cap" ] && l=$cap; [ "$l" -lt 30 ] && l=30; echo "$l"; }
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch. Create .venv with a CUDA torch first (make install TORCH=torch)" >&2
    echo "           or point PYTHON at an interpreter that has torch, triton, peft, transformers and pytest." >&2
    exit 1
fi
# Triton's interpreter must stay off: these are real-GPU checks (and it is broken with numpy 2.4 there).
unset TRITON_INTERPRET
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${LORA_KERNELS_COMMIT:-}" ]; then
    LORA_KERNELS_COMMIT="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
fi
export LORA_KERNELS_COMMIT

# ---------------------------------------------------------------------------------------------- 0. machine
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $LORA_KERNELS_COMMIT"
    echo "python: $PY"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
    command -v nvcc >/dev/null && nvcc --version | tail -2
    "$PY" -m lora_kernels info 2>&1 || echo "python -m lora_kernels info failed"
    "$PY" - <<'EOF'
import importlib.metadata as md, torch
for p in ("torch", "triton", "peft", "transformers", "numpy", "pytest"):
    try:
        print(f"{p}: {md.version(p)}")
    except Exception as e:
        print(f"{p}: not installed")
print("torch.version.cuda:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

CAP=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
if [ -z "$CAP" ]; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
        log "torch sees no CUDA device: nothing to check here (see $OUT/env.txt)"
        exit 1
    fi
    log "no CUDA device, GPU_CHECK_ALLOW_CPU=1: trying the script on the CPU"
    CAP="none"
fi

# ---------------------------------------------------------------------------------------------- 1. build
log "building lora_kernels._C for sm_${CAP/./} (TORCH_CUDA_ARCH_LIST=$CAP)"
T=$(limit 240 270)
BUILD_STATUS="failed"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
    BUILD_STATUS="skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ "$CAP" = "none" ]; then
    BUILD_STATUS="skipped (no GPU)"
elif [ ! -f setup.py ] || [ -z "$(ls csrc/*.cpp 2>/dev/null)" ]; then
    BUILD_STATUS="skipped (no extension sources)"
else
    export TORCH_CUDA_ARCH_LIST="$CAP" LORA_KERNELS_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    if timeout -k 10 "$T" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
        BUILD_STATUS="ok"
    else
        rc=$?
        if [ $rc -eq 124 ]; then
            BUILD_STATUS="timed out after ${T}s"  # a second build would time out too
        else
            BUILD_STATUS="failed (rc=$rc)"
            log "build_ext --inplace: $BUILD_STATUS; trying pip install -e ."
            if timeout -k 10 "$(limit 120 250)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
                    -e . >> "$OUT/build.log" 2>&1; then
                BUILD_STATUS="ok (pip -e)"
            fi
        fi
    fi
fi
NATIVE=$("$PY" -c "
from lora_kernels import backends
print('available' if 'native' in backends.available_backends('cuda') else 'unavailable: ' + backends.NATIVE_ERROR[:120])
" 2>&1 | tail -1)
log "build: $BUILD_STATUS; native backend: $NATIVE (log: $OUT/build.log)"

# ---------------------------------------------------------------------------------------------- 2. selftest
log "python -m lora_kernels selftest"
timeout -k 10 "$(limit 90 300)" "$PY" -m lora_kernels selftest > "$OUT/selftest.log" 2>&1
SELF_RC=$?
SELF_LINE=$(grep -E "^(PASSED|FAILED)" "$OUT/selftest.log" | tail -1)
[ -z "$SELF_LINE" ] && SELF_LINE="rc=$SELF_RC (see the log)"
log "selftest: $SELF_LINE"

# ---------------------------------------------------------------------------------------------- 3. tests
T=$(limit 200 150)
log "pytest -m gpu (limit ${T}s)"
timeout -k 10 "$T" "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/pytest_gpu.xml" tests > "$OUT/pytest_gpu.log" 2>&1
TEST_RC=$?
TEST_LINE=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/pytest_gpu.log" | tail -1)
[ $TEST_RC -eq 124 ] && TEST_LINE="timed out after ${T}s; ${TEST_LINE}"
log "tests: rc=$TEST_RC $TEST_LINE"

# ---------------------------------------------------------------------------------------------- 4. bench
T=$(limit 400 10)
BUDGET=$((T - 40))
[ "$BUDGET" -lt 20 ] && BUDGET=20
log "python -m bench --quick (time budget ${BUDGET}s, limit ${T}s)"
timeout -k 10 "$T" "$PY" -m bench --quick --out "$OUT/bench" --time-budget "$BUDGET" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
case $BENCH_RC in
    0) BENCH_STATUS="ok" ;;
    1) BENCH_STATUS="rows disagree with the reference (see WRONG in bench.log)" ;;
    124) BENCH_STATUS="timed out after ${T}s" ;;
    *) BENCH_STATUS="failed (rc=$BENCH_RC)" ;;
esac
log "bench: $BENCH_STATUS"

# ---------------------------------------------------------------------------------------------- summary
{
    echo
    echo "================================ gpu_check summary ================================"
    grep -E "^gpu:|^torch:|^triton:|^commit:" "$OUT/env.txt"
    printf "%-8s %-60s %s\n" "step" "result" "log"
    printf "%-8s %-60s %s\n" "build" "$BUILD_STATUS; native: ${NATIVE:0:40}" "$OUT/build.log"
    printf "%-8s %-60s %s\n" "selftest" "${SELF_LINE:0:60}" "$OUT/selftest.log"
    printf "%-8s %-60s %s\n" "tests" "rc=$TEST_RC ${TEST_LINE:0:55}" "$OUT/pytest_gpu.log"
    printf "%-8s %-60s %s\n" "bench" "$BENCH_STATUS" "$OUT/bench.log"
    if [ -f "$OUT/bench/latest/results.json" ]; then
        "$PY" - "$OUT/bench/latest/results.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["rows"]
count = {}
for r in rows:
    count[r["status"]] = count.get(r["status"], 0) + 1
p = d.get("peaks") or {}
if p:
    print(f"measured peaks: {p['matmul_flops'] / 1e12:.0f} TFLOP/s ({p['matmul']}), "
          f"{p['copy_bytes_per_s'] / 1e9:.0f} GB/s ({p['copy']})")
print("bench rows:", ", ".join(f"{v} {k}" for k, v in sorted(count.items())))
print("our backends on the headline cases (all contenders: bench/latest/table.txt):")
print(f"{'suite/phase':<26} {'case':<44} {'contender':<15} {'time':>10} {'t/base':>7} {'PEFT/t':>7} {'tax/PEFT':>8} {'%peak':>6}")
for r in rows:
    if r["suite"] == "overhead" or r["phase"] == "memory" or not r["contender"].startswith("ours"):
        continue
    case = f"{r['model']} {r['proj']} r={r['r']} T={r['tokens']}" + (f" d={r['adapters']}" if r.get("adapters") else "")
    phase = r["phase"] + (f" p={r['dropout']:g}" if r.get("dropout") else "")
    if r.get("ms") is None:
        t = r["status"]
    else:
        t = f"{r['ms'] * 1e3:.1f}us" if r["ms"] < 1 else f"{r['ms']:.3f}ms"
    f = lambda k, s: format(r[k], s) if r.get(k) is not None else "-"
    print(f"{r['suite'] + ' ' + phase:<26} {case:<44} {r['contender']:<15} {t:>10} {f('vs_base', '.2f'):>7} "
          f"{f('vs_peft', '.2f'):>7} {f('tax_vs_peft', '.2f'):>8} {f('pct_peak', '.0f'):>6}  {r.get('reason', '')[:60]}")
EOF
        sed -n '/^Summary/,$p' "$OUT/bench.log" | grep -v "^wrote\|^done in"
    fi
    echo "total: $(( $(date +%s) - START ))s; outputs in $OUT"
} 2>&1 | tee "$OUT/summary.txt"

[ "$SELF_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
