#!/usr/bin/env bash
# Several nodes: run this once on every node; torchrun's c10d rendezvous joins them into one job.
#   usage: NNODES=N RDZV_ENDPOINT=HOST:PORT launch/multinode.sh CONFIG [damformer train options...]
#   e.g.   (on each of 2 nodes) NNODES=2 RDZV_ENDPOINT=node001:29400 GPUS=4 launch/multinode.sh CONFIG
# NNODES         nodes in the job (required)
# RDZV_ENDPOINT  HOST:PORT of the first node, reachable from all (required); it hosts the rendezvous
# RDZV_ID        job id shared by the nodes (default: damformer; use a unique one per concurrent job)
# GPUS           processes per node (default: the visible GPUs, or 1 CPU process without a GPU)
# MAX_RESTARTS   times torchrun restarts the workers after a failure; they resume from the last
#                checkpoint (default 0; pass --auto-resume so a restarted worker continues the run)
# Ranks are handed out in arrival order, so no node rank is needed. Under Slurm, slurm/train.sh does this.
set -euo pipefail
config="${1:?usage: NNODES=N RDZV_ENDPOINT=HOST:PORT launch/multinode.sh CONFIG [options...]}"
shift
gpus="${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # a fresh store per restart (see damformer/runtime/distributed.py)
exec torchrun \
    --nnodes="${NNODES:?set NNODES, the number of nodes}" \
    --nproc_per_node="$gpus" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT of the first node}" \
    --rdzv_id="${RDZV_ID:-damformer}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m damformer train "$config" "$@"
