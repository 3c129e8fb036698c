#!/usr/bin/env bash
# Sharding as a Slurm job array: one array task per domain, each writing OUT_DIR/DOMAIN.
#
#   sbatch --array=0-3 slurm/shard.sh FLAIR2_ROOT OUT_DIR D004_2021 D014_2020 D029_2021 D031_2019
#   sbatch --array=0-1 slurm/shard.sh FLAIR2_ROOT shards/north D060_2021 D077_2021 -- --no-labels
#
# Options after "--" go to `damformer shard` (--split test, --no-labels, --sat-size N, ...). The array
# must have one index per domain (--array=0-(N-1)); a task outside the list fails with a message.
# Re-running the array resumes: complete, verified shards are skipped (damformer shard's behaviour).
# Afterwards, train with data.source: [OUT_DIR/D004_2021, OUT_DIR/D014_2020, ...].
#
#SBATCH --job-name=damformer-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

usage="usage: sbatch --array=0-(N-1) slurm/shard.sh FLAIR2_ROOT OUT_DIR DOMAIN_1 .. DOMAIN_N [-- shard options]"
root="${1:?$usage}"
out="${2:?$usage}"
shift 2
domains=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
    domains+=("$1")
    shift
done
[[ $# -gt 0 ]] && shift  # the "--"
[[ ${#domains[@]} -gt 0 ]] || { echo "$usage" >&2; exit 2; }
task="${SLURM_ARRAY_TASK_ID:?submit as an array: sbatch --array=0-$((${#domains[@]} - 1)) slurm/shard.sh ...}"
if (( task >= ${#domains[@]} )); then
    echo "array task $task has no domain: ${#domains[@]} domain(s) given, use --array=0-$((${#domains[@]} - 1))" >&2
    exit 2
fi
domain="${domains[$task]}"
echo "array task $task: domain $domain -> $out/$domain"
exec "${DAMFORMER:-python}" -m damformer shard --root "$root" --domains "$domain" --out "$out/$domain" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
