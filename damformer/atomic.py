"""Write files atomically: a temporary sibling, fsync, rename over the target, fsync of the folder.

Every writer of damformer goes through :func:`atomic_path` (checkpoints, shards and their sidecars,
manifests, configs, GeoTIFF maps, figures): a crash or a full disk leaves the previous file, never a
half-written one under the final name, and the temporary (``.NAME.tmp-PID``, hidden) is removed on
error. After the rename the folder is fsynced too, so the new name survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from damformer.errors import OptionError


def temporary_name(path: Path, *, keep_suffix: bool = False) -> Path:
    """The hidden temporary sibling of ``path`` for this process.

    ``keep_suffix``: for tools that infer the format from the extension (matplotlib):
    ``.NAME.tmp-PID.png`` instead of ``.NAME.png.tmp-PID``.
    """
    if keep_suffix:
        return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on an error it is removed.

    Example::

        with atomic_path(out / "figure.png", keep_suffix=True) as tmp:
            figure.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        _fsync(tmp)  # the data on disk before the name points at it
        tmp.replace(path)
        with contextlib.suppress(OSError):  # some file systems cannot fsync a folder: the rename stands
            _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_writable_folder(path: Path, option: str) -> None:
    """``path`` is a folder, or can become one, that this process can write (checked without writing).

    Raises:
        OptionError: naming ``option``, the folder and why.
    """
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path}: is a file, expected a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:  # a real probe: permission bits say nothing for root, nor for a read-only file system
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".damformer-probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        raise OptionError(f"{option} {path}: cannot write in {existing} ({exc.strerror})") from None
