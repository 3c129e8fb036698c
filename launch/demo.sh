#!/usr/bin/env bash
# The main job on the built-in miniature FLAIR-2 (what `make demo` runs).
#   usage: launch/demo.sh [OUT_DIR]      (default runs/demo; damformer must be on PATH)
# Steps: write the miniature dataset, read and validate the source and target domains, shard them
# (source: labelled south train split; target: unlabelled north train split; target test: labelled
# north test split), verify the shards, then train three models south -> north (source only, UDA
# self-training, DAM-Former with UDA), print their target mIoU side by side, and write DAM-Former's
# georeferenced maps of the north test patches (damformer predict).
set -euo pipefail
out="${1:-runs/demo}"
mkdir -p "$out"

echo "== 1/8 miniature FLAIR-2 -> $out/flair2"
damformer synth --out "$out/flair2" --overwrite --patch-size 128 --patches-per-zone 12

echo "== 2/8 south domains (UDA source), train split"
damformer read --root "$out/flair2" --domains south

echo "== 3/8 north domains (UDA target), held-out test split"
damformer read --root "$out/flair2" --split test --domains north

echo "== 4/8 shards: source, target (labels dropped: UDA never sees them), target test"
# --sat-size 16: a 160 m Sentinel-2 crop around each 25.6 m patch (configs/demo/damformer.yaml: footprint 0.16)
shard=(damformer shard --src "$out/flair2" --sat-size 16 --overwrite)
"${shard[@]}" --domains south --out "$out/shards/south" --max-samples 8
"${shard[@]}" --domains north --no-labels --out "$out/shards/north" --max-samples 8
"${shard[@]}" --domains north --split test --out "$out/shards/north-test"

echo "== 5/8 verify every shard (sizes, sha256, every sample decodes)"
damformer shard verify "$out/shards/south" "$out/shards/north" "$out/shards/north-test"

echo "== 6/8 train south -> north: source only, UDA, DAM-Former (configs/demo/*.yaml)"
# Two trainings at a time, one thread each (2 cores): DAM-Former (the longest) beside source only,
# then beside UDA. Each run's progress and losses go to OUT/RUN.log.
train() {
    local run=$1
    rm -rf "${out:?}/$run"
    echo "   $run: started (progress: $out/$run.log)"
    OMP_NUM_THREADS=1 damformer train "configs/demo/$run.yaml" --output-dir "$out/$run" \
        --set "data.source=[$out/shards/south]" --set "data.target=[$out/shards/north]" \
        --set "data.target_test=[$out/shards/north-test]" >"$out/$run.log" 2>&1 ||
        { echo "   $run: FAILED, last lines of $out/$run.log:"; tail -n 20 "$out/$run.log"; return 1; }
    echo "   $run: $(tail -n 1 "$out/$run.log")"
}
train damformer &
damformer_job=$!
train source_only
train uda
wait "$damformer_job"

echo "== 7/8 results on the target (north) test split"
damformer evaluate --checkpoint "$out/damformer/checkpoint.pt" --shards "$out/shards/north-test"
python3 launch/demo_table.py "$out"
echo
echo "The same runs with IoU per class (damformer compare; each run is also in its MLflow store,"
echo "e.g. mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(cd "$out" && pwd)/damformer/mlflow.db):"
damformer compare "$out/source_only" "$out/uda" "$out/damformer"

echo "== 8/8 georeferenced maps of the north test patches (DAM-Former): $out/maps"
# The scores printed here are evaluate's above: the same patches, read from the FLAIR-2 folder.
damformer predict --checkpoint "$out/damformer/checkpoint.pt" --src "$out/flair2" --domains north \
    --out "$out/maps" --quicklook --overwrite
