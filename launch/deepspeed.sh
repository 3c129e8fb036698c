#!/usr/bin/env bash
# One node with DeepSpeed's own launcher and ZeRO (stage 2 by default).
#   usage: launch/deepspeed.sh CONFIG [damformer train options...]
#   e.g.   GPUS=8 ZERO=1 launch/deepspeed.sh configs/ablation/damformer-rgbne-t.yaml
# GPUS  processes (default: the visible GPUs, or 2 CPU processes without a GPU)
# ZERO  1 or 2: launch/deepspeed/zero$ZERO.json (optimiser state, and with 2 gradients, partitioned)
# The same run works under torchrun: --set dist.engine=deepspeed --set dist.deepspeed_config=FILE.
# Without a GPU DeepSpeed needs DS_ACCELERATOR=cpu, set here; fp16 is GPU-only under DeepSpeed.
set -euo pipefail
config="${1:?usage: launch/deepspeed.sh CONFIG [damformer train options...]}"
shift
here="$(cd "$(dirname "$0")" && pwd)"
gpus="${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec deepspeed --num_gpus "$gpus" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module damformer \
    train "$config" --set dist.engine=deepspeed \
    --set "dist.deepspeed_config=$here/deepspeed/zero${ZERO:-2}.json" "$@"
