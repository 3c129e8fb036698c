"""Strategies: how the student is wrapped, back-propagated, stepped and checkpointed.

``base`` (the interface, and one process), ``ddp`` (DistributedDataParallel) and ``deepspeed`` (ZeRO
stage 1 or 2). The training loop sees only the :class:`~damformer.engine.strategies.base.Strategy`
interface; :func:`build_strategy` is the one place that chooses.
"""

from __future__ import annotations

import torch
from torch import nn

from damformer.config import ConfigError, RunConfig
from damformer.engine.strategies.base import Strategy
from damformer.engine.strategies.ddp import DataParallel
from damformer.runtime.distributed import DistContext

__all__ = ["Strategy", "build_strategy"]


def build_strategy(
    model: nn.Module,
    config: RunConfig,
    *,
    dist: DistContext,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    unused_parameters: bool = False,
) -> Strategy:
    """DeepSpeed when asked (also on one process), DDP on several processes, else one process.

    ``unused_parameters``: the training step may leave some parameters without a gradient (it says so:
    :attr:`damformer.uda.dacs.SelfTraining.leaves_parameters_unused`).
    """
    if config.dist.sync_bn and dist.enabled and device.type != "cuda":
        raise ConfigError("dist.sync_bn: SyncBatchNorm needs CUDA devices; set dist.sync_bn=false on CPU")
    kwargs = {"dist": dist, "device": device, "scaler": scaler}
    if config.dist.engine == "deepspeed":
        from damformer.engine.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, config, **kwargs)
    if dist.enabled:
        return DataParallel(model, config, unused_parameters=unused_parameters, **kwargs)
    return Strategy(model, config, **kwargs)
