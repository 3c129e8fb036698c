#!/usr/bin/env bash
# One node, one process per GPU (DDP, or DeepSpeed with --set dist.engine=deepspeed).
#   usage: launch/torchrun.sh CONFIG [damformer train options...]
#   e.g.   GPUS=4 launch/torchrun.sh configs/ablation/damformer-rgbne-t.yaml --set data.batch_size=2
# GPUS: processes to start (default: the visible GPUs, or 2 CPU processes without a GPU).
# The global batch is data.batch_size x GPUS x optim.grad_accum; the trainer prints it at the start.
set -euo pipefail
config="${1:?usage: launch/torchrun.sh CONFIG [damformer train options...]}"
shift
gpus="${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec torchrun --standalone --nproc_per_node="$gpus" -m damformer train "$config" "$@"
