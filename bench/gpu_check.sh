#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): run it from anywhere after the README's set-up, on a machine
# with one NVIDIA GPU; it finishes in under 8 minutes on one H100/H200-class GPU and writes
# outputs/gpu_check/gpu_check.json and gpu_check.md (rows for docs/benchmarks.md).
#
#   bench/gpu_check.sh                  # the device line, pytest -m cuda, training ramps, generation rates
#   bench/gpu_check.sh --dry_run        # the same steps on the CPU at tiny sizes (what CI runs)
#   PYTHON=/path/to/python bench/gpu_check.sh --budget_s 900
#
# Options are bench/gpu_check.py's (--help). Exit status 0 when everything ran and passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$HOME/.venvs/iidm/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" -m bench.gpu_check "$@"
