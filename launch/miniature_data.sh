#!/usr/bin/env bash
# The built-in miniature FLAIR-2 and its shards: what the demo and the miniature studies train on.
#   usage: launch/miniature_data.sh [OUT_DIR]      (default runs/demo; damformer must be on PATH)
#   MINIATURE_SYNTH_ARGS="--zones-per-domain 1 --test-zones-per-domain 1 --patches-per-zone 4": extra
#   `damformer synth` options, given last so that they win (a smaller copy for a plumbing check).
# Writes OUT/flair2 (2 south + 2 north domains; per domain 3 train zones and 4 test zones of 16 patches
# of 128 px), reads and validates the source and target domains, and shards them into OUT/shards:
# south (labelled source), north (target, labels dropped), north-test (labelled target test split),
# north-labelled (the target's train split with labels: validation and oracle) and south-test (labelled
# source test split, for supervised checks on the source domains); then verifies every shard.
set -euo pipefail
out="${1:-runs/demo}"
mkdir -p "$out"

echo "== miniature FLAIR-2 -> $out/flair2"
damformer synth --out "$out/flair2" --overwrite --patch-size 128 --zones-per-domain 3 --test-zones-per-domain 4 \
    --patches-per-zone 16 ${MINIATURE_SYNTH_ARGS:-}  # unquoted on purpose: one word per option

echo "== south domains (UDA source), train split"
damformer read --root "$out/flair2" --domains south

echo "== north domains (UDA target), held-out test split"
damformer read --root "$out/flair2" --split test --domains north

echo "== shards: source, target (labels dropped: UDA never sees them), target test, source test"
# --sat-size 16: a 160 m Sentinel-2 crop around each 25.6 m patch (model.footprint 0.16 in the configs)
shard=(damformer shard --src "$out/flair2" --sat-size 16 --overwrite)
"${shard[@]}" --domains south --out "$out/shards/south" --max-samples 8
"${shard[@]}" --domains north --no-labels --out "$out/shards/north" --max-samples 8
"${shard[@]}" --domains north --split test --out "$out/shards/north-test"
# The north train split with its labels, which UDA never reads: the validation split on which recipes
# are chosen (data.target_val), and the training set of the target-supervised oracle.
"${shard[@]}" --domains north --out "$out/shards/north-labelled" --max-samples 8
"${shard[@]}" --domains south --split test --out "$out/shards/south-test"

echo "== verify every shard (sizes, sha256, every sample decodes)"
damformer shard verify "$out/shards/south" "$out/shards/north" "$out/shards/north-test" "$out/shards/south-test" \
    "$out/shards/north-labelled"
