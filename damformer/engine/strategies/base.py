"""How the student is wrapped, back-propagated, stepped and checkpointed: one process, DDP or DeepSpeed.

The training loop calls the same five things whatever runs underneath (torchtitan's split of model,
parallelism and loop):

* ``forward`` — the module the UDA step calls for the student's forward (the model, DDP, DeepSpeed);
* ``accumulating(last)`` — the context of one micro-step (DDP skips its all-reduce but on the last);
* ``backward(loss)`` — with the fp16 loss scale where there is one;
* ``step()`` — unscale, clip, step (an fp16 overflow skips it), zero the gradients; returns metrics as
  device tensors (``grad_norm``, ``overflow``, ``loss_scale``), never reading them on the host;
* ``state_dict()`` / ``load_state_dict()`` / ``save_shards()`` — the optimiser (and loss scale) state.

:class:`Strategy` is the interface and the one-process implementation; :mod:`.ddp` and
:mod:`.deepspeed` are the others, and :func:`damformer.engine.strategies.build_strategy` picks one
from ``dist.engine`` and the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damformer.config import RunConfig
from damformer.engine.optim import build_optimizer
from damformer.runtime.distributed import DistContext, gather_objects

Metrics = dict[str, torch.Tensor]


class Strategy:
    """One process: the model as it is, torch's GradScaler for fp16.

    Args:
        model: the student (on its device).
        config: the run config (optimiser, clipping, precision).
        dist: this process's place among the ranks.
        device: where the model is.
        scaler: the fp16 loss scaler (None in fp32 and bf16).
    """

    name = "single"

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        *,
        dist: DistContext,
        device: torch.device,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model, self.config, self.dist, self.device, self.scaler = model, config, dist, device, scaler
        optim = config.optim
        self.optimizer = build_optimizer(
            model,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            head_lr_mult=optim.head_lr_mult,
            temporal_lr_mult=optim.temporal_lr_mult,
            head_scope=optim.head_lr_scope,
            fused=device.type == "cuda",  # one kernel for every parameter's update
        )

    @property
    def forward(self) -> nn.Module:
        """What the UDA step calls for the student's forward passes."""
        return self.model

    def accumulating(self, last: bool) -> AbstractContextManager:
        """The context of one micro-step (``last``: the one before the optimiser step)."""
        return contextlib.nullcontext()

    @property
    def backward(self) -> Callable[[torch.Tensor], None]:
        """Back-propagate a loss (scaled in fp16)."""
        if self.scaler is None:
            return lambda loss: loss.backward()
        scaler = self.scaler
        return lambda loss: scaler.scale(loss).backward()

    def step(self) -> Metrics:
        """Clip (unscaled), step (GradScaler skips an overflowing fp16 step), zero the gradients."""
        clip = self.config.optim.grad_clip
        metrics: Metrics = {}
        if self.scaler is not None and clip is not None:
            self.scaler.unscale_(self.optimizer)
        if clip is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).detach()
        if self.scaler is not None:
            # GradScaler.get_scale() reads the scale on the host; its tensor tells the same without waiting
            before = self.scaler._scale.detach().clone()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            metrics["overflow"] = (self.scaler._scale < before).float().reshape(())
            metrics["loss_scale"] = self.scaler._scale.detach().clone().reshape(())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def replica_digests(self) -> list[str]:
        """SHA-256 of the student's parameters on every rank (they must be equal; checked on save)."""
        digest = hashlib.sha256()
        for tensor in self.model.parameters():  # not buffers: each rank's BatchNorm statistics differ
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return gather_objects(self.dist, digest.hexdigest())

    def state_dict(self) -> dict[str, Any]:
        """The optimiser and loss-scale state (in checkpoint.pt)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], *, where: Path, output_dir: Path) -> None:
        """Restore :meth:`state_dict` (``where``: the checkpoint, for messages)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def refuse_resume(self, engine: str, world_size: int) -> str | None:
        """Why a checkpoint of this engine and number of processes cannot resume here (None: it can).

        The optimiser state of one process or DDP is whole in checkpoint.pt: any number of processes
        can resume it (the data streams count global samples).
        """
        if engine == "deepspeed":
            return (
                f"written with dist.engine=deepspeed, resumed with {self.name}: its optimiser state is in "
                "DeepSpeed's shards; resume with dist.engine=deepspeed"
            )
        return None

    def save_shards(self, output_dir: Path, iteration: int) -> dict[str, Any] | None:
        """Write per-rank state outside checkpoint.pt (collective); a record for the checkpoint."""
        return None

    def after_save(self, output_dir: Path, record: dict[str, Any] | None) -> None:
        """Once checkpoint.pt is in place (rank 0): remove what it no longer names."""

    def close(self) -> None:
        """Release what the strategy set up (a process group of its own)."""
