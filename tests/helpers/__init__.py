"""What several test modules share: free ports, and the `damformer train` command line of a test run.

The modules beside it: ``torchrun`` (launching 2-rank jobs, comparing students), ``checkpoints``
(watching a running job's checkpoint), ``slurm_cluster`` (a real single-node Slurm),
``training_process`` (a training child past its header).
"""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port free on the loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def damformer_command(*args: str) -> list[str]:
    """``python -m damformer -q ARGS`` (no progress bars: the tests read the output)."""
    return [sys.executable, "-m", "damformer", "-q", *args]


def train_command(overrides: list[str], *extra: str, log_level: str | None = None) -> list[str]:
    """``damformer train /dev/null --set ...``: a run defined by its overrides alone."""
    levels = ["--log-level", log_level] if log_level else []
    command = damformer_command(*levels, "train", "/dev/null", *extra)
    for assignment in overrides:
        command += ["--set", assignment]
    return command
