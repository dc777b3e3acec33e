#!/usr/bin/env bash
# The benchmark run by `make bench`. Edit the core commands here.
# Usage: scripts/bench.sh [PYTHON] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT="${2:-bench_out}"

"$PY" -m hetplugin.core simulate --out "$OUT/sim" --classes 3 --particles 2000 \
    --box 64 --pixel-size 3.0 --snr 0.3 --seed 2
time "$PY" -m hetplugin.core reconstruct --particles "$OUT/sim/particles.star" \
    --out "$OUT/rec" --truth "$OUT/sim/truth_class_001.mrc"
