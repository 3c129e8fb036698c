"""A training run's data: its shard sets, checked against the model, and the training streams.

The checks run before any compute (:mod:`damformer.runtime.shard_fit`, shared with evaluation).
"""

from __future__ import annotations

import logging
from typing import Any

from damformer.config import RunConfig
from damformer.loading.streams import EpochStream, RareClassStream
from damformer.runtime.distributed import DistContext
from damformer.runtime.shard_fit import check_shard_sets
from damformer.shards.shardset import ShardSet

log = logging.getLogger(__name__)


def open_shard_sets(config: RunConfig) -> dict[str, ShardSet | None]:
    """Open the source, target, target-test and target-val sets; check they fit the model and each other.

    Returns them by role (``source``, ``target``, ``target_test``, ``target_val``; None when not set).
    """
    data, model = config.data, config.model
    sets = {
        "source": ShardSet(data.source, domains=data.source_domains),
        "target": ShardSet(data.target, domains=data.target_domains) if config.uda.enabled else None,
        "target_test": ShardSet(data.target_test, domains=data.target_domains) if data.target_test else None,
        "target_val": ShardSet(data.target_val, domains=data.target_domains) if data.target_val else None,
    }
    opened = [(f"data.{role}", s, getattr(data, role), role != "target") for role, s in sets.items() if s]
    check_shard_sets(model, opened)
    return sets


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
