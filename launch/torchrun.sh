#!/usr/bin/env bash
# One node, one process per GPU (DDP, or DeepSpeed with --set dist.engine=deepspeed), every socket on
# the loopback. The workers see what torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR, ...),
# but the job runs under `damformer launch`: torchrun's agent and store listen on every network
# interface whatever the endpoint, and a single-node job has no reason to be reachable from outside.
#   usage: launch/torchrun.sh CONFIG [damformer train options...]
#   e.g.   GPUS=2 launch/torchrun.sh configs/ablation/damformer-rgbne-t.yaml
# GPUS: processes to start (default: the visible GPUs, or 2 CPU processes without a GPU).
# MAX_RESTARTS: restarts after a failing worker, from the last checkpoint (default 0).
# The global batch is the config's data.global_batch (the ablation cells: the paper's 2 + 2), split over
# GPUS processes, or refused at start when they cannot split it (2 over 4 GPUs); configs without it take
# data.batch_size x GPUS x optim.grad_accum. The trainer prints the split at the start.
set -euo pipefail
config="${1:?usage: launch/torchrun.sh CONFIG [damformer train options...]}"
shift
gpus="${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec python -m damformer launch --nproc "$gpus" --max-restarts "${MAX_RESTARTS:-0}" -- train "$config" --auto-resume "$@"
