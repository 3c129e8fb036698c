"""A training run's data: shard sets checked against the model, and the training streams.

Checked before any compute: every set fits the model (classes, labels, Sentinel-2: ``ShardSet.check_fits``)
and the model's footprint fits the shards' aerial patches and Sentinel-2 crops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from damformer.config import ConfigError, RunConfig
from damformer.data.loader import ShardSet
from damformer.data.sentinel import S2_PIXEL_M
from damformer.data.streams import EpochStream, RareClassStream
from damformer.engine.distributed import DistContext

log = logging.getLogger(__name__)


def open_shard_sets(config: RunConfig) -> tuple[ShardSet, ShardSet | None, ShardSet | None]:
    """Open the source, target and target-test sets and check they fit the model."""
    data, model = config.data, config.model
    sets = {
        "source": ShardSet(data.source, domains=data.source_domains),
        "target": ShardSet(data.target, domains=data.target_domains) if config.uda.enabled else None,
        "target_test": ShardSet(data.target_test, domains=data.target_domains) if data.target_test else None,
    }
    for role, shard_set in sets.items():
        if shard_set is not None:
            folders = getattr(data, role)
            shard_set.check_fits(model, role=f"data.{role}", labels=role != "target", folders=folders)
    if model.temporal:
        _check_footprint(model.footprint, sets["source"])
    return sets["source"], sets["target"], sets["target_test"]


def _check_footprint(footprint: float, shard_set: ShardSet) -> None:
    """The model crops its LR logits to the aerial footprint: the fraction must match the data."""
    sample = shard_set.first_sample()
    if sample.s2 is None:
        return
    side = sample.aerial.shape[-1]
    aerial_m, crop = side * abs(sample.transform.a), sample.s2.shape[-1]
    expected = aerial_m / (crop * S2_PIXEL_M)
    if abs(footprint - expected) > 0.02 * expected:
        raise ConfigError(
            f"model.footprint: {footprint:g}, but the shards' aerial patches ({side} px, {aerial_m:g} m) "
            f"cover {expected:.4g} of their {crop}-pixel Sentinel-2 crop ({crop * S2_PIXEL_M:g} m): set "
            f"model.footprint={expected:.4g}"
        )


def training_streams(
    config: RunConfig, source: ShardSet, target: ShardSet | None, *, dist: DistContext, pin_memory: bool
) -> tuple[Any, EpochStream | None]:
    """The source stream (rare class sampling, or epochs) and the target's (epochs), for one rank."""
    data, seed, uda = config.data, config.run.seed, config.uda
    common = {
        "batch_size": data.batch_size,
        "augment": data.augment,
        "rank": dist.rank,
        "world_size": dist.world_size,
        "verify": data.verify_shards,
        "on_error": data.on_error,
        "pin_memory": pin_memory,
    }
    epochs = {"num_workers": data.num_workers, **common}
    if uda.rcs:
        rcs = {"temperature": uda.rcs_temperature, "min_pixels": uda.rcs_min_pixels}
        source_stream: Any = RareClassStream(source, seed=seed, **rcs, **common)
    else:
        source_stream = EpochStream(source, seed=seed, **epochs)
    target_stream = EpochStream(target, seed=seed + 1, **epochs) if target is not None else None
    return source_stream, target_stream


def keep_global_batch(saved: int, *, config: RunConfig, world_size: int, where: Path) -> int:
    """The gradient accumulation that makes ``world_size`` processes take a checkpoint's global batch.

    A run resumed on another number of processes keeps its global batch (data.batch_size x processes x
    accumulation), so the optimisation continues unchanged; when no whole accumulation does, refuse.

    Raises:
        ConfigError: with the numbers, and the process counts that would work.
    """
    batch = config.data.batch_size
    if saved % (batch * world_size):
        raise ConfigError(
            f"{where}: its global batch {saved} is not a multiple of data.batch_size {batch} x {world_size} "
            f"process(es): resume on a number of processes that divides {saved // batch}"
        )
    accumulation = saved // (batch * world_size)
    if accumulation != config.optim.grad_accum:
        if config.dist.engine == "deepspeed":
            raise ConfigError(f"{where}: optim.grad_accum must stay {accumulation} under DeepSpeed")
        log.info(
            "global batch %d kept on %d process(es): gradient accumulation %d (the config says %d)",
            saved, world_size, accumulation, config.optim.grad_accum,
        )  # fmt: skip
    return accumulation
