"""Tar shard I/O: deterministic writing and validated streaming reads of WebDataset-style samples."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from damformer.data.shard_format import ShardFormatError, split_member_name

Encoded = dict[str, bytes]


def write_tar(path: Path, samples: Iterable[tuple[str, Encoded]]) -> None:
    """Write samples to ``path`` (the caller renames it into place).

    Members carry no time or owner, so the same samples always give the same bytes and the same sha256.
    """
    with path.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        tar.close()
        raw.flush()
        os.fsync(raw.fileno())


def iter_tar_samples(path: Path, *, shard: str | None = None) -> Iterator[tuple[str, Encoded]]:
    """Stream (key, {ext: bytes}) groups from a shard, validating every member.

    Raises:
        ShardFormatError: unreadable/truncated tar, non-file members, bad names, a key split in two groups.
    """
    name = shard or path.name
    seen: set[str] = set()
    current_key: str | None = None
    current: Encoded = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    raise ShardFormatError(f"{name}: member {member.name!r}: expected a regular file")
                key, ext = split_member_name(member.name, shard=name)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current
                    if key in seen:
                        raise ShardFormatError(f"{name}: sample {key} appears twice")
                    seen.add(key)
                    current_key, current = key, {}
                if ext in current:
                    raise ShardFormatError(f"{name}: sample {key} has {ext} twice")
                handle = tar.extractfile(member)
                assert handle is not None  # regular file
                current[ext] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        where = f"while reading sample {current_key}" if current_key else "before its first sample"
        complete = max(len(seen) - 1, 0)
        raise ShardFormatError(
            f"{name}: corrupt or truncated tar {where} ({complete} complete samples before it): {exc}"
        ) from None
    if current_key is not None:
        yield current_key, current


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
