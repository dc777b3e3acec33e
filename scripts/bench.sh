#!/usr/bin/env bash
# The benchmarks run by `make bench`: each prints its figures and the ratio to RELION
# (when RELION's programs are installed).
# Usage: scripts/bench.sh [PYTHON] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT="${2:-bench_out}"
mkdir -p "$OUT"

"$PY" benchmarks/bench_core.py --boxes 64 128 256
"$PY" benchmarks/bench_subtract.py --work "$OUT/subtract"
"$PY" benchmarks/bench_multiclass.py --work "$OUT/multiclass"
