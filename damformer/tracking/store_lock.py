"""One process at a time opens a new (or older-version) local MLflow sqlite store.

Opening a sqlite store runs MLflow's schema migrations. Two processes that open the same new file at
once (the demo's two trainings, several ``torchrun`` jobs under one folder of runs) both migrate it,
one of them fails half-way ("table _alembic_tmp_metrics already exists") and the store is left
unusable. An exclusive ``flock`` on ``<store>.lock`` beside the file serialises the opening: the
first process migrates, the others find the schema current. Once open, sqlite's own locking is enough.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store (a server, ``file:``)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX) :])  # sqlite:////abs/path or sqlite:///relative/path


@contextlib.contextmanager
def store_opening(uri: str) -> Iterator[None]:
    """Hold the store's opening lock (a no-op for non-sqlite URIs) for the ``with`` block."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        yield
