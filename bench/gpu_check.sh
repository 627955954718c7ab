#!/usr/bin/env bash
# The GPU check: the CUDA tests, then the throughput table (bench/gpu_check.py), on one CUDA GPU in at
# most ~9 minutes. Measured on an H200 (bench/RESULTS.md): tests 47 s (152 s on a machine's first run),
# detok_BB eager ~40 s, MAR-B + SiT-B ~60 s, then detok_BB compiled (its compile alone took over 75 s).
# Each stage's rows are written as it ends, so a run stopped by the limit keeps what it measured.
#
#   bash bench/gpu_check.sh [--official-path DIR] [--out DIR]
#   bash bench/gpu_check.sh --dry-run [--out DIR]     # the same script on a CPU with tiny sizes
#
# Run from anywhere; PYTHON (default: the repository's .venv, else python3) runs everything.
# Exit status: non-zero when the tests or the benchmark fail.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DRY=0
OUT=runs/gpu_check
BENCH_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; BENCH_ARGS+=(--dry-run); shift ;;
    --official-path) BENCH_ARGS+=(--official-path "$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --official-path DIR, --out DIR)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export GRADIO_ANALYTICS_ENABLED=False TORCH_HOME="${TORCH_HOME:-$ROOT/.cache/torch}" MPLBACKEND=Agg
mkdir -p "$OUT"

echo "== CUDA tests (tests/test_cuda.py) =="
# the dry run collects and skips them on a CPU (they need CUDA), which still checks that they import
TEST_LIMIT=$([[ $DRY == 1 ]] && echo 120 || echo 200)
set +e
timeout "$TEST_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then echo "gpu_check: tests/test_cuda.py failed (exit $status)" >&2; exit "$status"; fi

echo "== throughput =="
BENCH_LIMIT=$([[ $DRY == 1 ]] && echo 300 || echo 330)
timeout "$BENCH_LIMIT" "$PYTHON" bench/gpu_check.py "${BENCH_ARGS[@]}" --out "$OUT"
