"""Tar shard I/O: deterministic writing (webdataset's TarWriter) and validated zero-copy streaming reads."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from damformer.shards.format import ShardFormatError, split_member_name

# Member bytes by extension; read from a shard they are zero-copy views of its memory map.
Encoded = dict[str, bytes | memoryview]


def write_tar(path: Path, samples: Iterable[tuple[str, Encoded]]) -> None:
    """Write samples to ``path`` with webdataset's TarWriter (the caller renames it into place).

    Members carry no time and no owner (mtime 0, empty user and group), and TarWriter writes a sample's
    members in sorted order, so the same samples always give the same bytes and the same sha256. The
    bytes are already encoded (``encode_sample``): TarWriter's own encoders are off.
    """
    from webdataset import TarWriter  # imported here: reading shards never needs it

    with path.open("wb") as raw:
        with TarWriter(raw, user="", group="", mode=0o644, encoder=False, mtime=0) as writer:
            for key, files in samples:
                writer.write({"__key__": key, **files})
        raw.flush()
        os.fsync(raw.fileno())


BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


class _NotAFile(Exception):  # noqa: N818 (internal signal, carries the member name)
    """A member that is not a regular file."""


class _DamagedTar(Exception):  # noqa: N818 (internal signal, turned into a ShardFormatError)
    """Truncated or damaged tar bytes (turned into a ShardFormatError that names the sample)."""


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").decode("ascii")
    return int(text, 8) if text else 0


def _members(data: memoryview) -> Iterator[tuple[str, memoryview]]:
    """(member name, bytes) of each regular file of a tar image, with every header checked.

    A reader of its own rather than :mod:`tarfile`: tarfile's streaming mode reads in 10 KiB steps and
    copies every member, which made it the largest cost of loading a sample (benchmarks/RESULTS.md).
    This one walks a memory map and hands out zero-copy views; it refuses anything that is not a plain
    file (links, devices, pax/GNU extension headers), which our writer never produces.
    """
    offset = 0
    while True:
        header = bytes(data[offset : offset + BLOCK])
        if len(header) < BLOCK:
            raise _DamagedTar("unexpected end of data (no end-of-archive marker)")
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        try:
            expected = _octal(header[148:156])
            size = _octal(header[124:136])
        except (ValueError, UnicodeDecodeError):
            raise _DamagedTar("a tar header is damaged (size or checksum field)") from None
        if expected != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise _DamagedTar("a tar header checksum does not match (damaged data)")
        member = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace")
        if prefix:
            member = f"{prefix}/{member}"
        if header[156:157] not in (b"0", b"\0"):
            raise _NotAFile(member)
        start = offset + BLOCK
        if start + size > len(data):
            raise _DamagedTar(f"unexpected end of data in member {member!r}", member)
        yield member, data[start : start + size]
        offset = start + size + (-size % BLOCK)  # data is padded to whole blocks


def _map(path: Path) -> memoryview:
    """A read-only memory map of ``path``; it lives as long as a view of it does (shards are immutable)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


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
        for member, data in _members(_map(path)):
            key, ext = split_member_name(member, shard=name)
            if key != current_key:
                if current_key is not None:
                    yield current_key, current
                if key in seen:
                    raise ShardFormatError(f"{name}: sample {key} appears twice")
                seen.add(key)
                current_key, current = key, {}
            if ext in current:
                raise ShardFormatError(f"{name}: sample {key} has {ext} twice")
            current[ext] = data
    except _NotAFile as exc:
        raise ShardFormatError(f"{name}: member {exc.args[0]!r}: expected a regular file") from None
    except _DamagedTar as exc:
        reason, member = exc.args[0], exc.args[1] if len(exc.args) > 1 else None
        if member is not None:
            where = f"in sample {member.partition('.')[0]}"
        else:
            where = f"after sample {current_key}" if current_key else "before its first sample"
        complete = len(seen) - 1 if current_key is not None else 0  # the group in progress is not complete
        if member is not None and member.partition(".")[0] != current_key:
            complete += 1  # the damaged member starts a new sample: the previous group was whole
        raise ShardFormatError(
            f"{name}: corrupt or truncated tar {where} ({complete} complete samples before it): {reason}"
        ) from None
    except OSError as exc:
        raise ShardFormatError(f"{name}: cannot read the shard: {exc}") from None
    if current_key is not None:
        yield current_key, current


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
