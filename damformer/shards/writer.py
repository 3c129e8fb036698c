"""Offline sharding of FLAIR-2 into WebDataset tar shards, resumable and parallel, and their verification.

Layout of a shard set (one folder)::

    shards/south/D032_2019-00000.tar        samples of one domain (per-domain shards: choosing source and
    shards/south/D032_2019-00000.tar.json   target sets at training time is a choice of shard names)
    shards/south/manifest.json              written last: the set is complete when it exists

Each shard is written to a temporary file and renamed; its sidecar JSON (sample keys, class counts,
band sums, sha256) is written after the rename. A re-run skips every shard whose sidecar matches the
run's parameters and whose bytes still match the recorded sha256, so a killed run resumes where it
stopped and never mistakes a partial file for a shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from damformer.atomic import atomic_path, atomic_write_bytes
from damformer.data.flair2 import Flair2Dataset
from damformer.errors import DamformerError, OutputExistsError
from damformer.progress import progress
from damformer.shards.format import FORMAT_VERSION, ShardFormatError, decode_sample, encode_sample
from damformer.shards.manifest import MANIFEST_NAME, ShardStats, build_manifest, load_manifest
from damformer.shards.tario import iter_tar_samples, sha256_file, write_tar

log = logging.getLogger(__name__)

# What this writer names a shard: DOMAIN-NNNNN.tar (domain D080_2021 or any folder name without "/"),
# and its sidecar DOMAIN-NNNNN.tar.json. --overwrite removes only these and what the old manifest lists.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``1GB`` (10^9), ``512MiB`` (2^29), ``100k`` or a plain byte count."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"shard size: expected a size like 1GB or 512MiB, found {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("", "b"):
        return int(number)
    power = "kmgt".index(unit[0]) + 1
    return int(number * (1024**power if "i" in unit else 1000**power))


@dataclass(frozen=True)
class ShardWriteOptions:
    """Size bounds and parallelism of a sharding run.

    Attributes:
        max_samples: at most this many samples per shard.
        shard_bytes: target upper bound of a shard's size (estimated from the domain's first sample).
        workers: processes writing shards in parallel.
    """

    max_samples: int = 1000
    shard_bytes: int = 10**9
    workers: int = 1

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples: expected >= 1, found {self.max_samples}")
        if self.shard_bytes < 1:
            raise ValueError(f"shard_bytes: expected >= 1, found {self.shard_bytes}")
        if self.workers < 1:
            raise ValueError(f"workers: expected >= 1, found {self.workers}")


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its name, domain and the dataset indices of its samples."""

    name: str
    domain: str
    indices: tuple[int, ...]


def dataset_params(dataset: Flair2Dataset) -> dict[str, Any]:
    """The parameters that determine a shard set's content (recorded in its manifest)."""
    return {
        "src": str(dataset.layout.root.resolve()),
        "split": dataset.layout.split,
        "domains": dataset.domains,
        "with_labels": dataset.with_labels,
        "with_s2": dataset.with_s2,
        "patch_size": dataset.patch_size,
        "sentinel": asdict(dataset.sentinel),
        "format": FORMAT_VERSION,
    }


def plan_shards(dataset: Flair2Dataset, options: ShardWriteOptions) -> list[ShardJob]:
    """Split each domain's patches into consecutive shards bounded by count and estimated bytes."""
    by_domain: dict[str, list[int]] = {}
    for index, patch in enumerate(dataset.patches):
        by_domain.setdefault(patch.domain, []).append(index)
    jobs = []
    for domain, indices in sorted(by_domain.items()):
        estimate = sum(len(b) for b in encode_sample(dataset[indices[0]]).values()) + 512 * 6  # tar headers
        per_shard = max(1, min(options.max_samples, options.shard_bytes // estimate))
        for number, start in enumerate(range(0, len(indices), per_shard)):
            jobs.append(
                ShardJob(f"{domain}-{number:05d}.tar", domain, tuple(indices[start : start + per_shard]))
            )
    return jobs


def _fingerprint(params: dict[str, Any], jobs: list[ShardJob], dataset: Flair2Dataset) -> str:
    plan = [[job.name, [dataset.patches[i].patch_id for i in job.indices]] for job in jobs]
    text = json.dumps(
        {"params": {k: v for k, v in params.items() if k != "src"}, "plan": plan}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _complete_record(out: Path, job: ShardJob, fingerprint: str) -> dict[str, Any] | None:
    """The sidecar record of an already complete, intact shard, or None if it must be (re)written."""
    tar, sidecar = out / job.name, out / f"{job.name}.json"
    if not (tar.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("bytes") != tar.stat().st_size:
        return None
    if sha256_file(tar) != record.get("sha256"):
        log.warning("%s: checksum differs from its sidecar; rewriting it", tar)
        return None
    return record


_WORKER_DATASET: Flair2Dataset | None = None


def _init_worker(dataset: Flair2Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _write_shard(args: tuple[Path, ShardJob, str]) -> dict[str, Any]:
    out, job, fingerprint = args
    dataset = _WORKER_DATASET
    if dataset is None:  # _init_worker sets it in every process before the first shard
        raise RuntimeError("internal: a shard worker started without its dataset")
    record = _complete_record(out, job, fingerprint)
    if record is not None:
        return record | {"skipped": True}
    tar = out / job.name
    stats = ShardStats()

    def samples():  # noqa: ANN202
        for index in job.indices:
            sample = dataset[index]
            stats.add(sample)
            yield sample.patch_id, encode_sample(sample)

    try:
        with atomic_path(tar) as tmp:  # a killed or failing write never leaves a partial shard
            write_tar(tmp, samples())
            record = {
                "name": job.name,
                "domain": job.domain,
                "num_samples": len(job.indices),
                "bytes": tmp.stat().st_size,
                "sha256": sha256_file(tmp),
                "fingerprint": fingerprint,
                "stats": asdict(stats),
            }
    except OSError as exc:  # disk full, quota, permissions: nothing of this shard stays
        raise _write_failed(tar, exc) from None
    try:
        atomic_write_bytes(out / f"{job.name}.json", json.dumps(record).encode())
    except OSError as exc:
        tar.unlink(missing_ok=True)  # a shard without its sidecar would only be re-verified: drop it now
        raise _write_failed(out / f"{job.name}.json", exc) from None
    return record | {"skipped": False}


class ShardWriteError(DamformerError):
    """A shard, its sidecar or the manifest could not be written (disk full, quota, permissions)."""


def _write_failed(path: Path, exc: OSError) -> ShardWriteError:
    return ShardWriteError(
        f"{path}: cannot write ({exc.strerror or exc}); the shards already complete are kept and no "
        "partial file is left: free space, then run the same command again (it resumes)"
    )


def write_shards(
    dataset: Flair2Dataset,
    out: Path | str,
    options: ShardWriteOptions | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Shard ``dataset`` into ``out`` (resuming a previous run with the same parameters).

    Returns:
        The manifest dictionary (also written to ``out/manifest.json``) plus ``written``: the number of
        shards this call wrote (the others were already complete).

    Raises:
        OutputExistsError: ``out`` holds a complete shard set made with other parameters (and not
            ``overwrite``).
        DamformerError: a source file is malformed; complete shards stay, no partial shard is left.
    """
    options = options or ShardWriteOptions()
    out = Path(out)
    params = dataset_params(dataset)
    jobs = plan_shards(dataset, options)
    fingerprint = _fingerprint(params, jobs, dataset)
    if (out / MANIFEST_NAME).is_file():
        try:
            existing = load_manifest(out).get("fingerprint")
        except ShardFormatError:
            existing = None
        if existing != fingerprint:
            if not overwrite:
                raise OutputExistsError(
                    f"{out}: holds a shard set made with other parameters; "
                    "pass --overwrite or choose another --out"
                )
            ours = _files_of_the_set(out)
            _refuse_shadowing(out, jobs, ours)
            for old in ours:
                old.unlink()
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten below, after every shard is checked
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # left by a killed run
        stale.unlink()
    tasks = [(out, job, fingerprint) for job in jobs]
    records: dict[str, dict[str, Any]] = {}
    desc = f"shard {out.name}"
    try:
        if options.workers == 1:
            _init_worker(dataset)
            for record in progress(map(_write_shard, tasks), total=len(jobs), desc=desc, unit="shard"):
                records[record["name"]] = record
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(options.workers, initializer=_init_worker, initargs=(dataset,)) as pool:
                written = pool.imap_unordered(_write_shard, tasks)
                for record in progress(written, total=len(jobs), desc=desc, unit="shard"):
                    records[record["name"]] = record
    finally:
        # A failure in one worker terminates the others mid-write: remove what they left. Complete
        # shards (renamed, with their sidecar) stay, so the re-run after the fix resumes from them.
        for stale in out.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    skipped = sum(1 for r in records.values() if r["skipped"])
    if skipped:
        log.info("%d of %d shards were already complete and verified; skipped", skipped, len(jobs))
    manifest = build_manifest(params, fingerprint, [records[job.name] for job in jobs])
    try:
        atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    except OSError as exc:
        raise _write_failed(out / MANIFEST_NAME, exc) from None
    return manifest | {"written": len(jobs) - skipped}


def _files_of_the_set(out: Path) -> list[Path]:
    """The shards of the set in ``out`` that its manifest lists, and their sidecars: nothing else.

    Anything else in the folder (``backup-20240.tar``, a shard of a domain the manifest does not list,
    notes) is not ours to delete, even when named like a shard. An unreadable manifest lists nothing.
    """
    listed: set[str] = set()
    with contextlib.suppress(ShardFormatError, KeyError, TypeError):
        listed = {shard["name"] for shard in load_manifest(out)["shards"]}
    names = listed | {f"{name}.json" for name in listed}
    return sorted(path for path in out.iterdir() if path.is_file() and path.name in names)


def _refuse_shadowing(out: Path, jobs: list[ShardJob], ours: list[Path]) -> None:
    """A file the new set would write over, which the old set's manifest does not list, is not replaced."""
    mine = {path.name for path in ours}
    for job in jobs:
        for name in (job.name, f"{job.name}.json"):
            if (out / name).exists() and name not in mine:
                raise OutputExistsError(
                    f"{out / name}: not listed by {out / MANIFEST_NAME}, and the new shard set writes a file "
                    "of that name: move it out of the folder, or shard into another --out"
                )


def verify_shards(shard_dir: Path | str) -> dict[str, int]:
    """Re-check a shard set.

    Every shard must be present with its recorded size and sha256, and every sample must decode and be
    listed in the manifest, in order.

    Returns:
        {"shards": n, "samples": m}.

    Raises:
        ShardFormatError: naming the shard (and sample key) at fault.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    total = 0
    for shard in progress(manifest["shards"], desc=f"verify {shard_dir.name}", unit="shard"):
        path = shard_dir / shard["name"]
        if not path.is_file():
            raise ShardFormatError(f"{path}: shard listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"]:
            raise ShardFormatError(
                f"{path}: size: expected {shard['bytes']} bytes (manifest), found {path.stat().st_size}"
            )
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ShardFormatError(f"{path}: sha256 mismatch: expected {shard['sha256']}, found {digest}")
        keys = []
        for key, files in iter_tar_samples(path):
            decode_sample(files, key=key, shard=shard["name"])
            keys.append(key)
        if keys != shard["keys"]:
            raise ShardFormatError(
                f"{path}: samples: expected {shard['num_samples']} listed in the manifest, found {len(keys)} "
                "or another order"
            )
        total += len(keys)
    if total != manifest["num_samples"]:
        raise ShardFormatError(f"{shard_dir}: expected {manifest['num_samples']} samples, found {total}")
    return {"shards": len(manifest["shards"]), "samples": total}
