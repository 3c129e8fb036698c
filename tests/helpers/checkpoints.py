"""Polling a running job's checkpoint without competing with it for the CPU."""

from __future__ import annotations

from pathlib import Path

from damformer.runtime.artifacts import load_checkpoint


class CheckpointWatch:
    """The iteration of the checkpoint at `path`, read again only when a new file has been renamed into
    place: loading a test run's checkpoint (135 MB, CRC-checked) takes ~0.25 s, so a loop that loaded it
    every 50 ms kept a core busy and slowed the very run it was waiting for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int, int] | None = None
        self._iteration: int | None = None

    def iteration(self) -> int | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if identity != self._identity:  # checkpoints are replaced by rename: a new inode each time
            self._iteration = load_checkpoint(self.path)["iteration"]
            self._identity = identity
        return self._iteration
