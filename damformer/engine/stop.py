"""Stop requests: checkpoint and stop at the end of the current step, on a signal or a stop file.

Slurm sends a signal some minutes before the time limit (``--signal=B:USR1@600``); slurm/train.sh
turns it into a stop file (``DAMFORMER_STOP_FILE``), because a signal to the batch shell does not
reach the trainer's processes. The trainer also honours SIGUSR1 and SIGTERM sent to it directly.
Every rank must stop at the same iteration, so the ranks agree on the request after each step.

Ctrl-C (SIGINT) is a stop request too: the run checkpoints after the current step and exits. A second
Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint of the step in progress).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

from damformer.runtime.distributed import DistContext, any_rank

log = logging.getLogger(__name__)

STOP_FILE_VARIABLE = "DAMFORMER_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that installs the signal handlers; :meth:`requested` is checked after each step.

    Args:
        dist: the ranks that must agree.
        stop_file: a path whose existence asks for a stop (rank 0 looks); default: $DAMFORMER_STOP_FILE.
    """

    def __init__(self, dist: DistContext, stop_file: Path | None = None) -> None:
        self.dist = dist
        variable = os.environ.get(STOP_FILE_VARIABLE)
        self.stop_file = stop_file or (Path(variable) if variable else None)
        self.signalled: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if number == signal.SIGINT and self.signalled == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
        if number == signal.SIGINT:
            log.warning("Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to abort)")
        self.signalled = signal.Signals(number).name  # acted on at the end of the step, not here

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def reason(self) -> str | None:
        """This rank's reason to stop (a signal's name, or the stop file), if any."""
        if self.signalled:
            return self.signalled
        if self.dist.is_main and self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return None

    def requested(self) -> bool:
        """Whether any rank was asked to stop (collective under DDP: every rank calls it each step)."""
        return any_rank(self.dist, self.reason() is not None)
