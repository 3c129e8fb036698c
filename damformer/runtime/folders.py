"""Output folders checked before any compute."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from damformer.errors import OptionError


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
