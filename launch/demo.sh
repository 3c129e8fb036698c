#!/usr/bin/env bash
# The main job on the built-in miniature FLAIR-2 (what `make demo` runs).
#   usage: launch/demo.sh [OUT_DIR]      (default runs/demo; damformer must be on PATH)
# Steps so far: write the miniature dataset, then read and validate every patch of the
# south (source) and north (target) domains and print their statistics.
# Later steps (shard -> UDA train -> evaluate) join here as they land.
set -euo pipefail
out="${1:-runs/demo}"
mkdir -p "$out"

echo "== 1/3 miniature FLAIR-2 -> $out/flair2"
damformer synth --out "$out/flair2" --overwrite

echo "== 2/3 south domains (UDA source), train split"
damformer read --root "$out/flair2" --domains south

echo "== 3/3 north domains (UDA target), held-out test split"
damformer read --root "$out/flair2" --split test --domains north
