#!/usr/bin/env bash
# Every GPU figure of issue 20 in one time-boxed run, for a short loan of one GPU (about 10 minutes).
#
#   benchmarks/gpu_session.sh prepare          # here, with network: wheels for an offline GPU node in .whl/
#   source .whl/setup.sh && bash benchmarks/gpu_session.sh run OUT_DIR      # on the GPU node
#
# `prepare` runs ../shared/tools/device-wheels.sh (the package's runtime wheels, DeepSpeed without ops)
# and adds pytest and pytest-timeout, which the GPU tests need. `run` writes one log per step and
# summary.txt to OUT_DIR; each step has its own time limit, so one that hangs costs its limit, not the
# loan. Steps, most valuable first (STEPS="quick demo tests" selects):
#   quick  benchmarks/run_all.py --device cuda --quick: DAM-Former MiT-b5, 512 px, T = 12, one UDA
#          iteration in fp32, fp16, bf16 and compiled bf16 at batch 8 + 8, and the busy share at 2 + 2
#   demo   the whole demo DAM-Former training (MiT-b0, 128 px, batch 4, 600 iterations) on the GPU in bf16
#          (DEMO_PRECISIONS="bf16 fp16" adds fp16): it/s, with nvidia-smi's utilisation every second
#          (DEVICE=cpu DEMO_ITERS=4 STEPS=demo checks this step's plumbing on a machine without a GPU;
#          MINIATURE_SYNTH_ARGS="--zones-per-domain 1 ..." makes its data smaller for that check)
#   tests  the tests that skip without a GPU: no host sync inside a step (set_sync_debug_mode error),
#          DeepSpeed ZeRO-2 fp16 with loss scaling
# Record the figures in benchmarks/RESULTS.md with the GPU's name (nvidia-smi.txt).
set -uo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"  # steps call it again, from the repository root
cd "$(dirname "$script")/.."

prepare() {
    local tool=../shared/tools/device-wheels.sh
    [ -f "$tool" ] || { echo "gpu_session.sh: $tool not found (the shared device tools)" >&2; exit 2; }
    bash "$tool" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0 2>&1 \
        | grep -v "is ignored"  # pip's note on this machine's extra (absent) local index
    ls .whl/pytest-9.2.0-*.whl .whl/pytest_timeout-*.whl > /dev/null || exit 1
    du -sh .whl
}

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log to OUT/NAME.log, one summary line
    local name=$1 limit=$2 started rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || failed=$((failed + 1))
    echo "$name: exit $rc after $(($(date +%s) - started)) s" | tee -a "$out/summary.txt"
    tail -n 30 "$out/$name.log"
}

demo_speed() {  # demo_speed PRECISION OUT WORK: the demo DAM-Former on the GPU; its last log line gives it/s
    local precision=$1 out=$2 work=$3 iters=${DEMO_ITERS:-600}  # the demo's 600, half source-only
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 1 \
        > "$out/demo-$precision-utilisation.csv" 2>&1 &
    # The sampler's pid is put into the trap now: a local variable is gone when the EXIT trap runs.
    trap "kill $! 2>/dev/null" EXIT  # also when the step's time limit ends this shell
    damformer -q --log-level INFO train configs/demo/damformer.yaml --output-dir "$work/demo-$precision" \
        --set data.source="[$work/data/shards/south]" --set data.target="[$work/data/shards/north]" \
        --set data.target_test="[$work/data/shards/north-test]" --set run.device="${DEVICE:-cuda}" \
        --set run.precision="$precision" --set log.tracking=false --set optim.max_iters="$iters" \
        --set uda.source_warmup=$((iters / 2)) --set log.interval=100 --set eval.interval=0
}

run() {
    out=${1:?usage: gpu_session.sh run OUT_DIR}
    local steps=${STEPS:-quick demo tests}
    for name in $steps; do  # a typo must not cost the loan: check before any step
        case $name in
            quick | demo | tests) ;;
            *) echo "gpu_session.sh: unknown step $name (quick, demo, tests)" >&2 && exit 2 ;;
        esac
    done
    failed=0
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    work=$(mktemp -d)
    : > "$out/summary.txt"
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    git rev-parse HEAD > "$out/commit.txt" 2>/dev/null
    for name in $steps; do
        case $name in
            quick) step quick 390 python3 benchmarks/run_all.py --device cuda --quick --out "$out/quick" ;;
            demo)
                step demo-data 90 bash launch/miniature_data.sh "$work/data"
                for precision in ${DEMO_PRECISIONS:-bf16}; do  # issue 20's baseline: 4.2 it/s fp16, 4.5 bf16
                    step "demo-$precision" 180 bash "$script" demo-speed "$precision" "$out" "$work"
                done
                ;;
            tests)
                step tests 200 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu_readiness.py \
                    tests/engine/test_deepspeed.py -k "cuda"
                ;;
        esac
    done
    rm -rf "$work"
    echo "== summary"
    cat "$out/summary.txt"
    [ "$failed" = 0 ]  # non-zero when a step failed or ran out of time
}

case ${1:-} in
    prepare) prepare ;;
    run) shift && run "$@" ;;
    demo-speed) shift && demo_speed "$@" ;;
    *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script" && exit 2 ;;
esac
