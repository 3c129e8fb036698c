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

echo "== 1-5/8 miniature FLAIR-2, source/target domains read and validated, shards, verification"
bash "$(dirname "${BASH_SOURCE[0]}")/miniature_data.sh" "$out"

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
echo "The same runs with IoU per class (damformer compare). All three are in one MLflow store,"
echo "$out/mlflow.db: damformer ui $out  (then tick the runs and press Compare)"
damformer compare "$out/source_only" "$out/uda" "$out/damformer"

echo "== 8/8 georeferenced maps of the north test patches (DAM-Former): $out/maps"
# The scores printed here are evaluate's above: the same patches, read from the FLAIR-2 folder.
damformer predict --checkpoint "$out/damformer/checkpoint.pt" --src "$out/flair2" --domains north \
    --out "$out/maps" --quicklook --overwrite
