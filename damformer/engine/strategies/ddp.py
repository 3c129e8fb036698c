"""DDP around the student: gradients averaged over the ranks on the last micro-step."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from damformer.config import RunConfig
from damformer.engine.strategies.base import Strategy


class DataParallel(Strategy):
    """DDP around the student: gradients averaged over the ranks on the last micro-step."""

    name = "ddp"

    def __init__(
        self, model: nn.Module, config: RunConfig, *, unused_parameters: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(model, config, **kwargs)
        # DDP's contract: every parameter gets a gradient in every backward. When the training step says
        # some may not (``unused_parameters``), DDP searches for them, which costs a graph traversal per
        # backward and warns on every rank when it finds nothing: only then.
        unused = config.dist.find_unused_parameters or unused_parameters
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused,
            gradient_as_bucket_view=True,  # gradients are views of DDP's buckets: one layout, no copies
        )

    @property
    def forward(self) -> nn.Module:  # noqa: D102
        return self.ddp

    def accumulating(self, last: bool) -> AbstractContextManager:  # noqa: D102
        return contextlib.nullcontext() if last else self.ddp.no_sync()
