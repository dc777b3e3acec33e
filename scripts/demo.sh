#!/usr/bin/env bash
# The demo run by `make demo`: a headless Scipion project (under OUT_DIR/scipion)
# that simulates a heterogeneous data set (two structures differing by a domain
# motion, CTF, moderate SNR), imports it without alignment, runs hetplugin's
# multiclass refinement (ProtMulticlassRefine, global search) and prints, per
# class, size, resolution and accuracy against the truth. Takes minutes on a CPU.
# Usage: scripts/demo.sh [PYTHON] [OUT_DIR] [demo_scipion.py options, e.g. --particles 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT="${2:-demo_out}"
shift $(( $# < 2 ? $# : 2 ))

"$PY" scripts/demo_scipion.py --out "$OUT" "$@"
echo "demo: outputs in $OUT/"
