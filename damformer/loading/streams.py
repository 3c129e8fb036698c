"""Endless, resumable training streams, positioned in global samples (not per rank).

* :class:`EpochStream`: every epoch a seeded permutation of all samples, the epochs one after another;
* :class:`RareClassStream`: rare class sampling (draws with replacement).

Both are one global sequence (of samples, or of draws). A global step takes ``batch_size x world
size`` consecutive items of it and rank r takes the r-th slice, the same items one process takes in
its r-th gradient-accumulation micro-batch. The cursor (``state_dict``) counts global items, the same
on every rank: a run resumed on another number of processes continues the same sequence, and no
sample of an epoch is seen twice or skipped. Flips and rotations are seeded by (seed, global index).
Samples are read by key from the memory-mapped shards (:class:`ShardIndex`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from damformer.errors import DamformerError
from damformer.loading.augment import GeometricAugment, training_sample
from damformer.loading.collate import collate_samples
from damformer.loading.loader import ignore_interrupts
from damformer.loading.rcs import RareClassSampler
from damformer.shards.format import ShardFormatError, decode_sample
from damformer.shards.shardset import ShardSet
from damformer.shards.tario import Encoded, iter_tar_samples

log = logging.getLogger(__name__)


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


class _Samples(Dataset):
    """Map-style access to a global sample sequence: item g is the (g mod N)-th sample of epoch g // N.

    The shard index is opened lazily in each process (a DataLoader worker cannot receive memory maps).
    """

    def __init__(self, shard_set: ShardSet, keys: list[str], *, seed: int, augment: bool) -> None:
        self.shard_set, self.keys, self.seed = shard_set, keys, seed
        self.augment = GeometricAugment() if augment else None
        self.index: ShardIndex | None = None
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (the same in every process)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch, 11]).permutation(len(self.keys)))
        return self._order[1]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, position: int) -> dict[str, Any]:
        if self.index is None:  # verified by the main process already
            self.index = ShardIndex(self.shard_set, verify=False, on_error="skip")
        epoch, offset = divmod(position, len(self.keys))
        sample = self.index.sample(self.keys[int(self.order(epoch)[offset])])
        if self.augment is not None:
            sample = self.augment(sample, np.random.default_rng([self.seed, position, 43]))
        return sample


def _rank_slices(start: int, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """Global positions of this rank's batches from ``start`` on (endless)."""
    while True:
        first = start + rank * batch_size
        yield list(range(first, first + batch_size))
        start += batch_size * world_size


class EpochStream:
    """Training batches of one rank from the global sequence of epochs (see the module docstring).

    Args:
        shard_set: the shards; each is checked against its manifest here unless ``verify="never"``.
        batch_size: samples per batch of this rank.
        seed: the epochs' permutations and the augmentations are functions of it.
        augment: random flips / rot90 (aerial, label and every Sentinel-2 date alike).
        rank, world_size: this process among the data-parallel ranks.
        num_workers: DataLoader worker processes decoding ahead (0: in this process).
        pin_memory: page-locked batches (non-blocking copies to a GPU).
        on_error: a corrupt shard is ``raise`` (named) or ``skip`` (left out, with a warning).
    """

    VERSION = 2

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        batch_size: int,
        seed: int,
        augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        verify: str = "first",
        on_error: str = "raise",
    ) -> None:
        index = ShardIndex(shard_set, verify=verify != "never", on_error=on_error)
        self.samples = _Samples(shard_set, list(index.files), seed=seed, augment=augment)
        if not self.samples.keys:
            raise DamformerError(f"{shard_set.shards[0].path.parent}: no readable sample to train on")
        if num_workers == 0:
            self.samples.index = index
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = 0  # global samples consumed, by all ranks together
        self._batches: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, Any]:
        """This rank's next batch."""
        if self._batches is None:  # (re)start the loader at the position: after a resume too
            self._batches = iter(
                DataLoader(
                    self.samples,
                    batch_sampler=_rank_slices(self.position, self.batch_size, self.rank, self.world_size),
                    num_workers=self.num_workers,
                    collate_fn=collate_samples,
                    pin_memory=self.pin_memory,
                    worker_init_fn=ignore_interrupts if self.num_workers else None,
                    # a private generator: otherwise starting the loader draws its base seed from the
                    # global RNG (dropout's), at another moment in a resumed run than in an uninterrupted one
                    generator=torch.Generator().manual_seed(self.seed),
                )
            )
        batch = next(self._batches)
        self.position += self.batch_size * self.world_size
        return batch

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"version": self.VERSION, "position": self.position, "seed": self.seed,
                "samples": len(self.samples), "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position (whatever the number of ranks that saved it)."""
        if state.get("version") != self.VERSION:
            raise DamformerError(
                f"training stream state: format {state.get('version')}, expected {self.VERSION} (a "
                "checkpoint of an older damformer: start a new run)"
            )
        # The per-rank batch may differ (another number of processes, or another split of a stated
        # global batch): positions count global samples, and each optimiser step still takes the next
        # global batch of them, whoever takes which.
        for key in ("seed", "samples"):
            if state[key] != self.state_dict()[key]:
                raise DamformerError(
                    f"training stream state: saved with {key}={state[key]}, this run has "
                    f"{key}={self.state_dict()[key]}: the same sequence needs the same value"
                )
        self.position = int(state["position"])
        self._batches = None
