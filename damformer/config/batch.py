"""The global batch of a recipe, split over the processes of a job.

A paper's batch is global: DAFormer and DAM-Former train on 2 source + 2 target samples per optimiser
step, on one GPU. ``data.global_batch`` states it in a config; the per-process batch and the gradient
accumulation follow from the number of processes, so the same config trains the same recipe on 1 GPU
or 64, and a number of processes that cannot realise it is refused before any compute::

    data.global_batch: 2   on 1 process: 2 per step;  on 2: 1 each;  on 4: refused (0.5 each)
    data.global_batch: 8   data.batch_size: 2 (the most one process takes at once) on 2 processes:
                           2 per process x 2 processes x 2 accumulation steps

Without ``data.global_batch`` (configs of earlier damformer versions), ``data.batch_size`` is per process
and the global batch grows with the number of processes (a warning says so).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from damformer.errors import ConfigError

log = logging.getLogger(__name__)
LEGACY_RANK_BATCH = 2  # data.batch_size when neither it nor data.global_batch is set


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's samples are taken.

    Attributes:
        global_batch: source samples per optimiser step over every process (the target stream takes as
            many).
        world_size: processes of the job.
        micro_batch: samples per process and forward/backward pass.
        accumulation: forward/backward passes per optimiser step (gradient accumulation).
        stated: whether the config states the global batch (``data.global_batch``) or it follows the
            number of processes (``data.batch_size`` per process).
    """

    global_batch: int
    world_size: int
    micro_batch: int
    accumulation: int
    stated: bool

    def describe(self) -> str:
        """One line: ``global batch 2 source + 2 target = 1 per process x 2 processes x 1 accumulation``."""
        origin = "data.global_batch" if self.stated else "data.batch_size per process, not a stated recipe"
        return (
            f"global batch {self.global_batch} source + {self.global_batch} target per optimiser step "
            f"({origin}) = {self.micro_batch} per process x {self.world_size} process(es) x "
            f"{self.accumulation} accumulation step(s)"
        )


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def plan_batch(
    *, global_batch: int | None, batch_size: int | None, grad_accum: int, world_size: int
) -> BatchPlan:
    """The batch plan of ``data.global_batch`` / ``data.batch_size`` / ``optim.grad_accum`` on ``world_size``.

    With ``global_batch`` set, each process takes ``global_batch / world_size`` samples per step: in one
    pass, in ``grad_accum`` passes, or in the fewest passes of at most ``batch_size`` samples.

    Raises:
        ConfigError: the global batch cannot be split over ``world_size`` processes (the message gives
            the process counts that can, and how to state another recipe), or the keys contradict.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: expected >= 1")
    if global_batch is None:
        micro = batch_size or LEGACY_RANK_BATCH
        return BatchPlan(micro * world_size * grad_accum, world_size, micro, grad_accum, stated=False)
    if global_batch % world_size:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        larger = math.lcm(global_batch, world_size)
        raise ConfigError(
            f"data.global_batch {global_batch} (source samples per optimiser step, the target as many) "
            f"cannot be split over {world_size} processes ({global_batch / world_size:g} each). Ways out: "
            f"train on {', '.join(map(str, fits))} process(es) (one GPU per training: slurm/study.sh's "
            f"default; torchrun --nproc_per_node={fits[-1]}), or state another recipe: a global batch "
            f"that {world_size} processes can split, e.g. --set data.global_batch={larger} with the "
            f"learning rate you choose for it (linear scaling: optim.lr x {larger / global_batch:g}), "
            "knowing it is no longer the paper's recipe"
        )
    share = global_batch // world_size
    if batch_size is not None and grad_accum != 1:
        raise ConfigError(
            f"data.batch_size {batch_size} and optim.grad_accum {grad_accum}: with data.global_batch set, "
            "give one of them (data.batch_size: the most samples a process takes at once; the "
            "accumulation then follows)"
        )
    if batch_size is not None:
        micro = _largest_divisor_at_most(share, batch_size)
        return BatchPlan(global_batch, world_size, micro, share // micro, stated=True)
    if share % grad_accum:
        raise ConfigError(
            f"optim.grad_accum {grad_accum}: each of {world_size} process(es) takes {share} samples of "
            f"data.global_batch {global_batch} per step, which {grad_accum} passes cannot split: use a "
            f"divisor of {share}, or data.batch_size to bound the samples per pass"
        )
    return BatchPlan(global_batch, world_size, share // grad_accum, grad_accum, stated=True)


def warn_if_unstated(plan: BatchPlan) -> None:
    """A multi-process run whose global batch follows the process count says so, once."""
    if not plan.stated and plan.world_size > 1:
        log.warning(
            "data.global_batch is not set: the global batch (%d) is data.batch_size x %d processes, so the "
            "recipe changes with the number of GPUs; state data.global_batch to keep it",
            plan.global_batch,
            plan.world_size,
        )


def keep_global_batch(plan: BatchPlan, saved: int, *, engine: str, where: object) -> BatchPlan:
    """The plan that continues a checkpoint's global batch ``saved`` on ``plan.world_size`` processes.

    A stated global batch is the config's (``--resume`` refuses to change ``data.global_batch``), so
    only its split changes. A per-process batch keeps its size and the accumulation absorbs the new
    number of processes; when no whole accumulation does, refuse.

    Raises:
        ConfigError: with the numbers, and the process counts that would work.
    """
    if plan.stated:
        if saved != plan.global_batch:
            raise ConfigError(
                f"{where}: trained with a global batch of {saved}, the config states "
                f"data.global_batch {plan.global_batch}: restore it, or start a new run.output_dir"
            )
        return plan
    batch, world = plan.micro_batch, plan.world_size
    if saved % (batch * world):
        raise ConfigError(
            f"{where}: its global batch {saved} is not a multiple of data.batch_size {batch} x {world} "
            f"process(es): resume on a number of processes that divides {saved // batch}"
        )
    accumulation = saved // (batch * world)
    if accumulation != plan.accumulation:
        if engine == "deepspeed":
            raise ConfigError(f"{where}: optim.grad_accum must stay {accumulation} under DeepSpeed")
        log.info(
            "global batch %d kept on %d process(es): gradient accumulation %d (the config says %d)",
            saved, world, accumulation, plan.accumulation,
        )  # fmt: skip
    return BatchPlan(saved, world, batch, accumulation, stated=False)
