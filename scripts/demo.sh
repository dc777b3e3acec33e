#!/usr/bin/env bash
# The demo run by `make demo`: simulate a small heterogeneous data set, then
# reconstruct it with the hetplugin core. Edit the core commands here.
# Usage: scripts/demo.sh [PYTHON] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT="${2:-demo_out}"

"$PY" -m hetplugin.core simulate --out "$OUT/sim" --classes 2 --particles 400 \
    --box 48 --pixel-size 3.0 --snr 0.5 --seed 1
"$PY" -m hetplugin.core reconstruct --particles "$OUT/sim/particles.star" \
    --out "$OUT/rec" --truth "$OUT/sim/truth_class_001.mrc"
echo "demo: outputs in $OUT/"
