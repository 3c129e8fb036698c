"""Endless, resumable batch streams for training.

An endless loader runs epoch after epoch; the rare-class-sampled source stream reads shard samples by
key.

Both hold a small ``state_dict`` (a cursor) so a resumed run draws exactly the batches an uninterrupted
run would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from damformer.data.augment import GeometricAugment, training_sample
from damformer.data.collate import collate_samples
from damformer.data.loader import LoaderOptions, ShardLoader, ShardSet
from damformer.data.rcs import RareClassSampler
from damformer.data.shard_format import ShardFormatError, decode_sample
from damformer.data.shard_io import Encoded, iter_tar_samples

log = logging.getLogger(__name__)


class EndlessLoader:
    """A :class:`ShardLoader` that starts the next epoch when one ends."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader = loader
        self._iterator: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, Any]:
        """The next batch."""
        for _ in range(2):  # at most one epoch boundary per call
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise RuntimeError("the shard set yields no batch")

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.loader.load_state_dict(state)
        self._iterator = None


class ShardIndex:
    """Random access to the samples of a shard set by key (zero-copy views of the memory-mapped shards)."""

    def __init__(self, shard_set: ShardSet, *, verify: bool = True, on_error: str = "raise") -> None:
        self.files: dict[str, tuple[Encoded, str]] = {}
        for shard in shard_set.shards:
            try:
                if verify:
                    shard.verify()  # once per process: the index lives as long as the training
                for key, files in iter_tar_samples(shard.path):
                    self.files[key] = (files, shard.path.name)
            except ShardFormatError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipping %s: %s", shard.path.name, exc)
                for key in shard.keys:
                    self.files.pop(key, None)

    def sample(self, key: str) -> dict[str, Any]:
        """The training sample of ``key``."""
        files, shard = self.files[key]
        return training_sample(decode_sample(files, key=key, shard=shard, masks=False))


class RareClassStream:
    """Source batches drawn by rare class sampling (method.md section 5), flipped/rotated like the loader.

    Args:
        shard_set: the labelled source shards (their manifest holds per-sample class pixel counts).
        batch_size: samples per batch.
        temperature, min_pixels: RCS parameters.
        seed: draws and augmentations are functions of (seed, draw index).
        augment: random flips / rot90.
        rank, world_size: data-parallel ranks split each global batch of ``batch_size x world_size``
            draws: rank r takes draws ``r * batch_size ...`` of it, the same samples a single process
            would take in its r-th gradient-accumulation micro-batch.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        batch_size: int,
        temperature: float = 0.01,
        min_pixels: int | None = None,
        seed: int = 0,
        augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        verify: str = "first",
        on_error: str = "raise",
        pin_memory: bool = False,
    ) -> None:
        self.index = ShardIndex(shard_set, verify=verify != "never", on_error=on_error)
        self.pin_memory = pin_memory
        keys = set(self.index.files)  # without the shards skipped as corrupt (on_error="skip")
        counts = {
            key: entry["class_pixels"]
            for manifest in shard_set.manifests
            for key, entry in manifest["samples"].items()
            if key in keys and entry.get("class_pixels") is not None
        }
        self.sampler = RareClassSampler(counts, temperature=temperature, min_pixels=min_pixels, seed=seed)
        self.batch_size, self.seed = batch_size, seed
        self.augment = GeometricAugment() if augment else None
        self.rank, self.world_size = rank, world_size
        self.draws = 0  # draws consumed by all ranks together

    def next(self) -> dict[str, Any]:
        """The next batch."""
        samples = []
        first = self.draws + self.rank * self.batch_size
        for draw in range(first, first + self.batch_size):
            key, _ = self.sampler.draw(draw)
            sample = self.index.sample(key)
            if self.augment is not None:
                sample = self.augment(sample, np.random.default_rng([self.seed, draw, 43]))
            samples.append(sample)
        self.draws += self.batch_size * self.world_size
        batch = collate_samples(samples)
        if self.pin_memory:  # page-locked: the copy to the GPU overlaps compute (non_blocking)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"draws": self.draws, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.draws = int(state["draws"])


def endless_loader(
    shard_set: ShardSet,
    *,
    batch_size: int,
    seed: int,
    shuffle_buffer: int,
    augment: bool,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    verify: str = "first",
    on_error: str = "raise",
    pin_memory: bool = False,
) -> EndlessLoader:
    """An endless, padded, seeded shard stream for one rank."""
    options = LoaderOptions(
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        augment=augment,
        pad=True,
        verify=verify,  # type: ignore[arg-type]
        on_error=on_error,  # type: ignore[arg-type]
        pin_memory=pin_memory,
    )
    return EndlessLoader(
        ShardLoader(shard_set, options, rank=rank, world_size=world_size, num_workers=num_workers)
    )
