"""The one progress-bar helper of damformer (tqdm on stderr; quiet mode and non-TTY friendly)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_QUIET_ENV = "DAMFORMER_QUIET"


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar of this process and its children."""
    if quiet:
        os.environ[_QUIET_ENV] = "1"
    else:
        os.environ.pop(_QUIET_ENV, None)


def _options(desc: str, unit: str, total: int | None) -> dict:
    interactive = sys.stderr.isatty()
    return {
        "desc": desc,
        "unit": unit,
        "total": total,
        "disable": os.environ.get(_QUIET_ENV) == "1",
        "file": sys.stderr,
        "dynamic_ncols": True,
        "mininterval": 0.1 if interactive else 30.0,
    }


@contextlib.contextmanager
def progress_bar(
    *, desc: str, unit: str = "it", total: int | None = None
) -> Iterator[Callable[[int], object]]:
    """A bar advanced by calling what the ``with`` gives (``advance(n)``), for work that is not a loop."""
    bar = tqdm(**_options(desc, unit, total))
    try:
        yield bar.update
    finally:
        bar.close()


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar on stderr.

    On a terminal the bar redraws in place; in a log file (batch jobs) it prints a line at most every
    30 seconds, so long jobs still show they are alive without flooding the log.
    """
    yield from tqdm(items, **_options(desc, unit, total))
