"""The one progress helper of damformer: a tqdm bar on a terminal, log lines in a log file, none with -q."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

_log = logging.getLogger("damformer.progress")
LOG_INTERVAL_S = 30.0  # seconds between progress lines in a log file

T = TypeVar("T")

_QUIET_ENV = "DAMFORMER_QUIET"


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar of this process and its children."""
    if quiet:
        os.environ[_QUIET_ENV] = "1"
    else:
        os.environ.pop(_QUIET_ENV, None)


class _LogLines:
    """Progress as whole log lines (INFO, ``damformer.progress``) when stderr is not a terminal.

    tqdm's carriage-return redraws turn a log file into one long line that log records cut into
    (``train: 40%|####  [...]INFO damformer...``). Lines through logging never interleave with other
    records, ``-q`` silences them with the INFO lines, and other ranks stay silent.
    """

    def __init__(self, desc: str, unit: str, total: int | None, interval: float = LOG_INTERVAL_S) -> None:
        self.desc, self.unit, self.total, self.interval = desc, unit, total, interval
        self.count = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now, done=False)

    def close(self) -> None:
        self._emit(time.monotonic(), done=True)

    def _emit(self, now: float, *, done: bool) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.count / elapsed
        where = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        line = f"{self.desc}: {where}"
        if done:
            line += f" done in {_duration(elapsed)} ({rate:.2f} {self.unit}/s)"
        else:
            line += f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
            line += f", {rate:.2f} {self.unit}/s"
            if self.total and rate > 0:
                line += f", about {_duration((self.total - self.count) / rate)} left"
        _log.info(line)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _disabled() -> bool:
    return os.environ.get(_QUIET_ENV) == "1"


def _tqdm_options(desc: str, unit: str, total: int | None) -> dict:
    return {
        "desc": desc,
        "unit": unit,
        "total": total,
        "file": sys.stderr,
        "dynamic_ncols": True,
        "mininterval": 0.1,
    }


@contextlib.contextmanager
def progress_bar(
    *, desc: str, unit: str = "it", total: int | None = None
) -> Iterator[Callable[[int], object]]:
    """A bar advanced by calling what the ``with`` gives (``advance(n)``), for work that is not a loop."""
    if _disabled():
        yield lambda _n=1: None
        return
    bar: tqdm | _LogLines = (
        tqdm(**_tqdm_options(desc, unit, total)) if sys.stderr.isatty() else _LogLines(desc, unit, total)
    )
    try:
        yield bar.update
    finally:
        bar.close()


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with progress on stderr.

    On a terminal a tqdm bar redraws in place; in a log file (batch jobs, ``launch/demo.sh``) a log line
    at most every 30 seconds and one at the end, so long jobs show they are alive without flooding it.
    """
    if _disabled():
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, **_tqdm_options(desc, unit, total))
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    lines = _LogLines(desc, unit, total)
    finished = False
    try:
        for item in items:
            yield item
            lines.update()
        finished = True
    finally:
        if finished:
            lines.close()
