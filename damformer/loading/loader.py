"""Streaming loader over damformer shard sets: rank- and worker-aware, seeded, exactly resumable.

How an epoch is laid out (every rank and worker computes the same plan from the manifest, so nothing
is communicated):

1. the shards are shuffled with ``(seed, epoch)``; when there are fewer shards than readers
   (ranks x workers), each shard is split into interleaved units (every k-th sample) so no reader idles;
2. units go to readers greedily by sample count; reader ``rank * num_workers + worker`` streams its
   units, shuffles them in a seeded buffer of raw bytes, decodes, augments and batches;
3. with ``pad=True`` (needed for DDP, where every rank must take the same number of steps) every
   reader's stream is padded to the same whole number of batches by repeating its own first samples;
   padded samples have ``valid = False`` so metrics can drop them. Within an epoch no real sample is
   seen twice and none is dropped.

The PyTorch DataLoader takes batches from its workers round-robin, so the rank's n-th batch comes from
worker ``n % num_workers``. To resume at batch k, each worker skips the batches it had already
delivered (its stream is re-read without decoding) and worker roles are rotated by k so that the
next batch comes from the right one: a resumed loader yields exactly the batches an uninterrupted one
would.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from damformer.errors import DamformerError
from damformer.loading.augment import GeometricAugment, training_sample
from damformer.loading.collate import collate_samples
from damformer.logs import RANK_LOCAL
from damformer.shards.format import ShardFormatError, decode_sample
from damformer.shards.shardset import ShardInfo, ShardSet
from damformer.shards.tario import Encoded, iter_tar_samples

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A worker's last item when it skipped samples after its last batch: counted, never handed to the user.
SKIP_REPORT = "skip_report"


@dataclass(frozen=True)
class Unit:
    """Every ``stride``-th sample of a shard starting at ``offset``: the unit of work of one reader."""

    shard: int
    stride: int
    offset: int
    count: int


def plan_epoch(shards: Sequence[ShardInfo], *, epoch: int, seed: int, num_readers: int) -> list[list[Unit]]:
    """Assign the epoch's samples to readers (same result in every process)."""
    order = np.random.default_rng([seed, epoch, 17]).permutation(len(shards))
    factor = math.ceil(num_readers / len(shards))
    units = [
        Unit(int(s), factor, j, len(range(j, len(shards[s].keys), factor)))
        for s in order
        for j in range(factor)
    ]
    units.sort(key=lambda u: -u.count)  # stable: equal counts keep the shuffled order
    parts: list[list[Unit]] = [[] for _ in range(num_readers)]
    loads = [0] * num_readers
    for unit in units:
        target = loads.index(min(loads))
        parts[target].append(unit)
        loads[target] += unit.count
    return parts


@dataclass(frozen=True)
class LoaderOptions:
    """Behaviour of the shard loader.

    Attributes:
        batch_size: samples per batch (per rank).
        shuffle_buffer: size of the seeded shuffle buffer (raw bytes, per reader); 1 disables shuffling.
        seed: shard order, buffer and augmentation draws are functions of (seed, epoch, reader, batch).
        augment: apply random flips / rot90 to aerial, label and every Sentinel-2 date alike.
        pad: pad every reader to the same number of batches (required for DDP and for resume).
        on_error: ``raise`` on a corrupt shard or sample, or ``skip`` it (logged and counted).
        verify: check each shard's size and sha256 against the manifest before reading it: ``first``
            (the first epoch this process reads; about one more read of the data), ``always`` or ``never``.
        pin_memory: batches in page-locked memory, so copies to a GPU (``non_blocking``) overlap compute.
    """

    batch_size: int = 2
    shuffle_buffer: int = 64
    seed: int = 0
    augment: bool = True
    pad: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    verify: Literal["first", "always", "never"] = "first"
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer: expected >= 1")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', found {self.on_error!r}")
        if self.verify not in ("first", "always", "never"):
            raise ValueError(f"verify: expected first, always or never, found {self.verify!r}")


class ShardStream(IterableDataset):
    """The per-process stream of batches (use :class:`ShardLoader`, which wraps it in a DataLoader)."""

    def __init__(
        self, shard_set: ShardSet, options: LoaderOptions, *, rank: int, world_size: int, num_workers: int
    ) -> None:
        super().__init__()
        self.shards = shard_set.shards
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(num_workers, 1)
        self.epoch = 0
        self.start_batch = 0
        self.augment = GeometricAugment() if options.augment else None
        self.skipped = 0
        self.verify_epoch: int | None = None  # with verify="first": the first epoch this process reads

    @property
    def num_readers(self) -> int:
        """Readers over all ranks: world_size x workers per rank."""
        return self.world_size * self.num_workers

    def batches_per_reader(self) -> list[int]:
        """Batches each reader of this rank yields this epoch (all equal when padding)."""
        parts = plan_epoch(
            self.shards, epoch=self.epoch, seed=self.options.seed, num_readers=self.num_readers
        )
        counts = [sum(u.count for u in part) for part in parts]
        size = self.options.batch_size
        if self.options.pad:
            return [math.ceil(max(counts) / size)] * self.num_workers
        mine = counts[self.rank * self.num_workers : (self.rank + 1) * self.num_workers]
        return [math.ceil(c / size) for c in mine]

    def __len__(self) -> int:
        return sum(self.batches_per_reader())

    def _must_verify(self) -> bool:
        mode = self.options.verify
        return mode == "always" or (mode == "first" and self.epoch == self.verify_epoch)

    def _raw(self, units: Sequence[Unit]) -> Iterator[tuple[str, Encoded, str]]:
        verify = self._must_verify()
        for unit in units:
            shard = self.shards[unit.shard]
            if verify:
                try:
                    shard.verify()
                except ShardFormatError as exc:
                    if self.options.on_error == "raise":
                        raise
                    self.skipped += 1
                    log.warning("skipping %s (not read): %s", shard.path.name, exc, extra=RANK_LOCAL)
                    continue
            try:
                for index, (key, files) in enumerate(iter_tar_samples(shard.path)):
                    if index % unit.stride == unit.offset:
                        yield key, files, shard.path.name
            except ShardFormatError as exc:
                if self.options.on_error == "raise":
                    raise
                self.skipped += 1
                log.warning("skipping the rest of %s: %s", shard.path.name, exc, extra=RANK_LOCAL)

    def _shuffled(self, units: Sequence[Unit], reader: int) -> Iterator[tuple[str, Encoded, str]]:
        rng = np.random.default_rng([self.options.seed, self.epoch, reader, 29])
        buffer: list[tuple[str, Encoded, str]] = []
        for record in self._raw(units):
            if len(buffer) < self.options.shuffle_buffer:
                buffer.append(record)
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], record = record, buffer[pick]
            yield record
        rng.shuffle(buffer)
        yield from buffer

    def _decoded(self, record: tuple[str, Encoded, str], valid: bool) -> dict[str, Any] | None:
        key, files, shard = record
        try:
            sample = training_sample(decode_sample(files, key=key, shard=shard, masks=False))
        except ShardFormatError as exc:
            if self.options.on_error == "raise":
                raise
            self.skipped += 1
            log.warning("skipping sample: %s", exc, extra=RANK_LOCAL)
            return None
        sample["valid"] = valid
        return sample

    def reader_batches(self, role: int, *, skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        """Batches of one reader of this rank (``role`` in 0..num_workers-1), after skipping some."""
        reader = self.rank * self.num_workers + role
        parts = plan_epoch(
            self.shards, epoch=self.epoch, seed=self.options.seed, num_readers=self.num_readers
        )
        size = self.options.batch_size
        target = self.batches_per_reader()[role] * size
        stream = self._padded(parts, reader, target)
        skip = skip_batches * size
        pending: list[dict[str, Any]] = []
        position = 0
        reported = self.skipped
        for record, valid in stream:
            position += 1
            if position <= skip:
                continue  # already delivered before the resume: not even decoded
            sample = self._decoded(record, valid)
            if sample is not None:
                pending.append(sample)
            if position % size == 0 and pending:
                batch = self._batch(pending, reader, (position - 1) // size)
                batch["num_skipped"], reported = self.skipped - reported, self.skipped
                yield batch
                pending = []
        if pending:  # the last, partial batch (pad=False only: padded streams end on a whole batch)
            batch = self._batch(pending, reader, (position - 1) // size)
            batch["num_skipped"], reported = self.skipped - reported, self.skipped
            yield batch
        if self.skipped != reported:  # skips after the last batch (or a reader with nothing left to read)
            yield {SKIP_REPORT: True, "num_skipped": self.skipped - reported}

    def _padded(
        self, parts: list[list[Unit]], reader: int, target: int
    ) -> Iterator[tuple[tuple[str, Encoded, str], bool]]:
        produced = 0
        for record in self._shuffled(parts[reader], reader):
            produced += 1
            yield record, True
        if not self.options.pad:
            return
        donor = reader if produced else next((i for i, p in enumerate(parts) if p), 0)
        while produced < target:  # repeat this reader's own first samples, marked invalid
            before = produced
            for record in self._shuffled(parts[donor], donor):
                if produced >= target:
                    break
                produced += 1
                yield record, False
            if produced == before:
                break

    def _batch(self, samples: list[dict[str, Any]], reader: int, batch_index: int) -> dict[str, Any]:
        if self.augment is not None:
            rng = np.random.default_rng([self.options.seed, self.epoch, reader, batch_index, 31])
            samples = [self.augment(s, rng) for s in samples]
        return collate_samples(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Rotate roles so that the DataLoader's first pick (worker 0) is the role owing batch start_batch.
        role = (worker + self.start_batch) % self.num_workers
        delivered = _delivered(self.start_batch, role, self.num_workers)
        yield from self.reader_batches(role, skip_batches=delivered)


def _delivered(start_batch: int, role: int, num_workers: int) -> int:
    """How many of the first ``start_batch`` rank-level batches came from ``role`` (round-robin)."""
    return max(0, (start_batch - role + num_workers - 1) // num_workers)


def ignore_interrupts(_worker_id: int) -> None:
    """Worker processes leave Ctrl-C to the main process.

    Ctrl-C reaches every process of the terminal's foreground group. The trainer treats it as a stop
    request and checkpoints after the current step; workers that died of it would take the batches of
    that step with them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader:
    """Iterate batches of a shard set for one rank, with exact mid-epoch resume.

    Example::

        loader = ShardLoader(ShardSet("shards/south"), LoaderOptions(batch_size=2), rank=0, world_size=1)
        for batch in loader:          # one epoch; the next iteration is the next epoch
            ...
        state = loader.state_dict()   # save with the checkpoint; load_state_dict(state) to resume

    Args:
        shard_set: the shards to read.
        options: batch size, shuffling, augmentation, padding, error policy.
        rank, world_size: this process among the data-parallel ranks.
        num_workers: DataLoader worker processes (0 reads in the main process).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        options: LoaderOptions | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0..{world_size - 1}, found {rank}")
        self.options = options or LoaderOptions()
        self.num_workers = num_workers
        self.world_size = world_size
        self.stream = ShardStream(
            shard_set, self.options, rank=rank, world_size=world_size, num_workers=num_workers
        )
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out
        self.skipped = 0  # corrupt shards/samples skipped (on_error="skip"), over the loader's life

    def __len__(self) -> int:
        self.stream.epoch = self.epoch
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.epoch, self.stream.start_batch = self.epoch, self.batch
        if self.stream.verify_epoch is None:
            self.stream.verify_epoch = self.epoch  # this process's first epoch (also after a resume)
        # Our streams draw from their own seeded generators; a private generator keeps the DataLoader
        # from drawing its worker base seed from the global RNG, which would make training randomness
        # (dropout) depend on when epochs start, and a resumed run differ from an uninterrupted one.
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.options.seed),
            worker_init_fn=ignore_interrupts if self.num_workers else None,
            pin_memory=self.options.pin_memory,
        )
        for batch in loader:
            self.skipped += batch.pop("num_skipped", 0)
            if batch.pop(SKIP_REPORT, False):
                continue
            self.batch += 1
            yield batch
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        """Position in the data stream (store it in checkpoints)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.options.batch_size,
            "seed": self.options.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; the layout that determines batches must be the same."""
        if state.get("version") != STATE_VERSION:
            raise DamformerError(
                f"loader state: expected version {STATE_VERSION}, found {state.get('version')}"
            )
        for field in ("world_size", "num_workers", "batch_size", "seed"):
            mine = self.state_dict()[field]
            if state[field] != mine:
                raise DamformerError(
                    f"loader state: saved with {field}={state[field]}, this run has {field}={mine}; "
                    "an exact resume needs the same value"
                )
        if state["batch"] and not self.options.pad:
            raise DamformerError("loader state: mid-epoch resume needs pad=True")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
