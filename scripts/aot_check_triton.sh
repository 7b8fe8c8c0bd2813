#!/usr/bin/env bash
# The AOT check (lora_kernels/kernels/aot_check.py) under other Triton versions, leaving .venv alone:
# each version is installed once with `pip install --no-deps --target` into $TRITON_VERSIONS_DIR
# (default /tmp/lora_kernels_tritons) and put first on PYTHONPATH.
#
#   scripts/aot_check_triton.sh [VERSION ...] [-- AOT_CHECK_ARGS ...]
#   scripts/aot_check_triton.sh 3.6.0 3.9.0                        # every shipped config, both ends of the range
#   scripts/aot_check_triton.sh 3.6.0 -- --report /tmp/r36.json   # the static report under 3.6.0
#
# Default versions: the ends of the range declared in pyproject.toml. Exit status: non-zero when any
# version fails (a config that does not compile, spills, or a Triton that is not the one asked for).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DIR="${TRITON_VERSIONS_DIR:-/tmp/lora_kernels_tritons}"
VERSIONS=()
while [[ $# -gt 0 && "$1" != "--" ]]; do VERSIONS+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
if [[ ${#VERSIONS[@]} -eq 0 ]]; then
    # "triton>=A,<=B; ..." in pyproject.toml -> A B
    read -r -a VERSIONS < <(grep -o '"triton>=[0-9.]*,<=[0-9.]*' "$ROOT/pyproject.toml" | grep -o '[0-9][0-9.]*' | tr '\n' ' ')
fi
status=0
for v in "${VERSIONS[@]}"; do
    target="$DIR/triton-$v"
    if [[ ! -f "$target/triton/__init__.py" ]]; then
        "$PY" -m pip install -q --no-deps --target "$target" "triton==$v"
    fi
    got="$(cd /tmp && PYTHONPATH="$target" "$PY" -c 'import triton; print(triton.__version__)')"
    if [[ "$got" != "$v" ]]; then
        echo "triton $v: imported $got instead" >&2
        status=1
        continue
    fi
    echo "== triton $v ($target)" >&2
    if ! (cd "$ROOT" && env -u TRITON_INTERPRET PYTHONPATH="$target:$ROOT" \
            "$PY" -m lora_kernels.kernels.aot_check "$@"); then
        status=1
    fi
done
exit $status
