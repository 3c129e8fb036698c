"""Logging of the ``damformer`` command: one voice per job under torchrun, quiet when asked.

Rank 0 logs everything at the chosen level. Other ranks would repeat it (the same config warning,
the same MLflow line, the same PyTorch UserWarning once per process), so they log only errors and
warnings about themselves: a record logged with ``extra=RANK_LOCAL`` (e.g. a corrupt shard that only
this rank's reader met), prefixed with the rank.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

RANK_LOCAL = {"rank_local": True}  # pass as ``extra=``: a warning about this rank alone
FORMAT = "%(levelname)s %(name)s: %(message)s"


def process_rank() -> int:
    """This process's global rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _OwnWarningsOnly(logging.Filter):
    """On ranks other than 0: errors, and warnings marked rank-local."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or bool(getattr(record, "rank_local", False))


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was when logging was set up.

    ``damformer.cli.main`` can run inside another program (a notebook, pytest) that swaps and closes
    ``sys.stderr``; a handler bound to the old stream would then fail on every later record.
    """

    @property
    def stream(self) -> TextIO:  # logging.StreamHandler's attribute, read at each record
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(level: str, *, quiet: bool) -> None:
    """Log to stderr at ``level`` (``quiet``: WARNING unless a level was asked for), one voice per job.

    Args:
        level: DEBUG, INFO, WARNING or ERROR; None: INFO, or WARNING with ``quiet``.
        quiet: ``-q``: no INFO lines (and, elsewhere, no progress).
    """
    level = level or ("WARNING" if quiet else "INFO")
    rank = process_rank()
    handler = _CurrentStderr()
    handler.setFormatter(
        logging.Formatter(FORMAT if rank == 0 else f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    )
    if rank != 0:
        handler.addFilter(_OwnWarningsOnly())
        warnings.simplefilter("ignore")  # library UserWarnings: rank 0 shows each one
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if level != "DEBUG":  # MLflow's store migrations and DeepSpeed's banners are not our story
        # MLflow installs its own handler and level when imported: its variable is the way to set it
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # rasterio logs each GDAL read error at INFO before raising it: our error names the file once
        for noisy in ("mlflow", "alembic", "DeepSpeed", "rasterio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
