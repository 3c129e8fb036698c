#!/usr/bin/env bash
# Multi-node DAM-Former training under Slurm: one torchrun per node, c10d rendezvous on the first node,
# checkpoint + requeue before the time limit.
#
#   sbatch slurm/train.sh CONFIG [damformer train options...]
#   sbatch --nodes=4 --partition=gpu --time=48:00:00 slurm/train.sh configs/ablation/damformer-rgbne-t.yaml
#   sbatch --nodes=2 slurm/train.sh CONFIG --set dist.engine=deepspeed --set dist.zero_stage=2
#   sbatch --array=0-15 slurm/train.sh --study-task TASK_FILE    (what slurm/study.sh submits: array task
#                          i trains the i-th (config, seed) of a study, frozen in TASK_FILE)
#
# The #SBATCH lines below are defaults for V100 nodes (4 GPUs, 32 cores each); override any of them on
# the sbatch command line. Variables (export them before sbatch, which passes the environment on):
#   NPROC_PER_NODE  processes per node          default: the GPUs Slurm gives each node, else 1
#   RDZV_PORT       rendezvous port on node 1   default: 20000 + job id % 20000
#   LOG_DIR         per-job logs                default: logs (relative to the submission folder)
#   MAX_RESTARTS    torchrun restarts after a worker failure (from the last checkpoint), default 1
#   DAMFORMER       the damformer command's Python   default: python (the one on PATH)
#
# Before the time limit Slurm sends USR1 to this script (--signal=B:USR1@600: 10 minutes ahead). The
# script asks the trainer to stop through a stop file (a signal to the batch shell does not reach the
# workers): every rank finishes its step, rank 0 writes the checkpoint, and the job requeues itself
# (scontrol requeue). The requeued job starts this script again, which resumes from that checkpoint.
#
#SBATCH --job-name=damformer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

python="${DAMFORMER:-python}"
if [[ "${1:-}" == "--study-task" ]]; then
    task_file="${2:?usage: sbatch --array=0-N slurm/train.sh --study-task TASK_FILE}"
    index="${SLURM_ARRAY_TASK_ID:?--study-task runs as a task of a job array (sbatch --array=...)}"
    # NUL-separated arguments: every value arrives intact, nothing is parsed by the shell.
    mapfile -d '' -t task_args < <("$python" -m damformer.study.task "$task_file" "$index")
    if (( ${#task_args[@]} == 0 )); then
        echo "array task $index: no arguments in $task_file" >&2
        exit 2
    fi
    echo "study task $index of $task_file"
    set -- "${task_args[@]}"
fi
config="${1:?usage: sbatch slurm/train.sh CONFIG [damformer train options...]}"
shift
job="${SLURM_JOB_ID:?run this script with sbatch}"
nodes="${SLURM_JOB_NUM_NODES:-1}"
nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || nproc=1
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
port="${RDZV_PORT:-$((20000 + job % 20000))}"
log_dir="${LOG_DIR:-logs}/${SLURM_JOB_NAME:-damformer}-${job}"
mkdir -p "$log_dir"
stop_file="$log_dir/stop-request"
rm -f "$stop_file"  # a requeued job starts clean

# What the workers need: threads per process, NCCL error handling, one rendezvous store per attempt.
export OMP_NUM_THREADS="$(( ${SLURM_CPUS_PER_TASK:-$nproc} / nproc > 0 ? ${SLURM_CPUS_PER_TASK:-$nproc} / nproc : 1 ))"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export DAMFORMER_STOP_FILE="$stop_file"
# Uncomment where the default interface is wrong (e.g. nodes with several networks):
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_DEBUG=WARN

echo "job $job (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $nproc process(es), rendezvous $head_node:$port"
echo "logs: $log_dir; config: $config"

requeue=0
on_pre_timeout() {
    echo "$(date -Is) pre-timeout signal: asking the trainer to checkpoint and stop"
    requeue=1
    touch "$stop_file"
}
trap on_pre_timeout USR1

# --auto-resume: the first attempt finds no checkpoint and starts; a requeued one continues.
srun --kill-on-bad-exit=1 --output="$log_dir/node-%n.log" \
    "$python" -m torch.distributed.run \
    --nnodes="$nodes" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:$port" --rdzv_id="damformer-$job" \
    --max-restarts="${MAX_RESTARTS:-1}" \
    -m damformer train "$config" --auto-resume "$@" &
step=$!

set +e
wait "$step"
status=$?
while kill -0 "$step" 2>/dev/null; do  # wait returns early when the trap runs: wait again
    wait "$step"
    status=$?
done
set -e

if [[ "$requeue" == 1 ]]; then
    echo "$(date -Is) the trainer stopped with status $status; requeueing job $job"
    scontrol requeue "$job"
    exit 0
fi
echo "$(date -Is) training finished with status $status"
exit "$status"
