#!/usr/bin/env bash
# The main job on the built-in miniature FLAIR-2 (what `make demo` runs).
#   usage: launch/demo.sh [OUT_DIR]      (default runs/demo; damformer must be on PATH)
# Steps so far: write the miniature dataset, read and validate the source and target domains, then
# shard them (source: labelled south train split; target: unlabelled north train split; target test:
# labelled north test split) and verify the shards.
# Later steps (UDA train -> evaluate) join here as they land.
set -euo pipefail
out="${1:-runs/demo}"
mkdir -p "$out"

echo "== 1/5 miniature FLAIR-2 -> $out/flair2"
damformer synth --out "$out/flair2" --overwrite

echo "== 2/5 south domains (UDA source), train split"
damformer read --root "$out/flair2" --domains south

echo "== 3/5 north domains (UDA target), held-out test split"
damformer read --root "$out/flair2" --split test --domains north

echo "== 4/5 shards: source, target (labels dropped: UDA never sees them), target test"
damformer shard --src "$out/flair2" --domains south --out "$out/shards/south" --max-samples 8 --overwrite
damformer shard --src "$out/flair2" --domains north --no-labels --out "$out/shards/north" --max-samples 8 \
    --overwrite
damformer shard --src "$out/flair2" --domains north --split test --out "$out/shards/north-test" --overwrite

echo "== 5/5 verify every shard (sizes, sha256, every sample decodes)"
damformer shard verify "$out/shards/south" "$out/shards/north" "$out/shards/north-test"
