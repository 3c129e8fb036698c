#!/usr/bin/env bash
# A damformer study on Slurm: a job array with one task per unfinished (config, seed), each task the
# same srun + torchrun path as slurm/train.sh (multi-GPU, checkpoint + requeue before the time limit),
# and one dependent job (afterany) that collects the results (tables, figure, MLflow parent run).
#
#   bash slurm/study.sh STUDY.yaml [sbatch options of the trainings...] [-- damformer study options...]
#   bash slurm/study.sh configs/studies/paper.yaml --partition=gpu
#   bash slurm/study.sh configs/studies/paper.yaml --time=12:00:00 -- --tracking-uri http://mlflow:5000
#
# Run it where sbatch works (a login node), not with sbatch itself. Running it again submits only what
# is not finished: finished runs are skipped, interrupted ones resume from their checkpoint.
# Each training is one array task on ONE GPU by default (STUDY_SBATCH below): the paper's recipe is 2
# source + 2 target per optimiser step (data.global_batch), which 1 or 2 processes can split and 4
# cannot, and Slurm packs several trainings on a node. The trainings' sbatch options come after those
# defaults and override them (e.g. --gpus-per-node=2 for two processes per training; a config whose
# global batch the processes cannot split is refused at start, naming the counts that can), then
# slurm/train.sh's #SBATCH lines (V100 nodes) fill in the rest. The options after "--" go to every
# `damformer study` call (--set, --output-dir, --tracking-uri).
# Variables (exported to the jobs as sbatch does by default):
#   DAMFORMER       the damformer command's Python         default: python (the one on PATH)
#   MAX_PARALLEL    array tasks running at once (%N)        default: no limit
#   STUDY_SBATCH    sbatch options of every training, before yours
#                   default: "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8"
#   COLLECT_SBATCH  sbatch options of the collecting job    default: "--cpus-per-task=4 --time=2:00:00"
#   STUDY_POLL      seconds between the collecting job's checks that no requeued task is left (60)
#   NPROC_PER_NODE, RDZV_PORT, LOG_DIR, MAX_RESTARTS: as for slurm/train.sh
#
# The collecting job runs this script with --collect.
#SBATCH --job-name=damformer-study-collect
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
set -euo pipefail
python="${DAMFORMER:-python}"

if [[ "${1:-}" == "--collect" ]]; then  # the dependent job, after every array task ended (afterany)
    study="${2:?usage: slurm/study.sh --collect STUDY.yaml ARRAY_JOB [damformer study options...]}"
    array_job="${3:?usage: slurm/study.sh --collect STUDY.yaml ARRAY_JOB [damformer study options...]}"
    shift 3
    # A task requeued before the time limit counts as ended for afterany while it waits to start again:
    # wait until no task of the array is pending or running, so the table holds its final result.
    if [[ "$array_job" != none ]]; then
        while [[ -n "$(squeue --noheader --jobs="$array_job" --format=%i 2>/dev/null)" ]]; do
            sleep "${STUDY_POLL:-60}"
        done
    fi
    exec "$python" -m damformer study "$study" --collect "$@"
fi

study="${1:?usage: bash slurm/study.sh STUDY.yaml [sbatch options...] [-- damformer study options...]}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sbatch_args=()
study_args=()
while (( $# )); do
    if [[ "$1" == "--" ]]; then
        shift
        study_args=("$@")
        break
    fi
    sbatch_args+=("$1")
    shift
done

# "COUNT TASK_FILE": the unfinished runs, frozen for this submission (array task i = line i).
read -r count task_file < <("$python" -m damformer study "$study" --slurm-tasks "${study_args[@]}")
read -r -a collect_args <<< "${COLLECT_SBATCH:---cpus-per-task=4 --time=2:00:00}"
# One GPU per training unless the caller's options (later on the line: they win) say otherwise.
read -r -a training_defaults <<< "${STUDY_SBATCH:---nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8}"
dependency=()
if (( count > 0 )); then
    array_job=$(sbatch --parsable --job-name=damformer-study --array="0-$((count - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" \
        "${training_defaults[@]}" "${sbatch_args[@]}" "$here/train.sh" --study-task "$task_file")
    array_job="${array_job%%;*}"
    dependency=(--dependency="afterany:$array_job")
    echo "submitted job array $array_job: $count training(s) of $study ($task_file)"
else
    echo "every run of $study is finished: only collecting"
fi
collect_job=$(sbatch --parsable "${dependency[@]}" "${collect_args[@]}" "$here/study.sh" \
    --collect "$study" "${array_job:-none}" "${study_args[@]}")
echo "submitted collecting job ${collect_job%%;*}${dependency:+ (after ${array_job})}"
