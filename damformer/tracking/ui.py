"""``damformer ui``: the MLflow UI over one run folder's local store, bound to the loopback by default.

MLflow's server has no authentication: anyone who reaches its port can read every run and delete it.
So it listens on 127.0.0.1 unless told otherwise, and a user on a cluster reaches it through an SSH
tunnel (``ssh -L 5000:127.0.0.1:5000 NODE``). The command is an argument list, never a shell string:
a run folder named ``x; rm -rf ~`` is just a strange path.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

from damformer.errors import DamformerError
from damformer.tracking.mlflow_tracker import STORE_NAME, default_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


class UIError(DamformerError):
    """The run folder has no MLflow store, or the server could not start."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_command(run_dir: Path, *, host: str = DEFAULT_HOST, port: int = 5000) -> list[str]:
    """The ``mlflow server`` argument list for the store of ``run_dir``.

    Raises:
        UIError: ``run_dir`` has no ``mlflow.db`` (tracking was off, or another --tracking-uri was used).
    """
    store = run_dir / STORE_NAME
    if not store.is_file():
        raise UIError(
            f"{store}: no MLflow store in this run folder (log.tracking was off, or the run tracked to "
            "another --tracking-uri: open that server instead)"
        )
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", default_tracking_uri(run_dir),
    ]  # fmt: skip


def serve(run_dir: Path, *, host: str = DEFAULT_HOST, port: int = 5000) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C; returns the server's exit code."""
    command = ui_command(run_dir, host=host, port=port)
    if not is_loopback(host):
        log.warning(
            "binding the MLflow UI to %s: it has no authentication, anyone who reaches port %d can read "
            "and delete runs. Prefer the default 127.0.0.1 with an SSH tunnel",
            host,
            port,
        )
    print(f"MLflow UI of {run_dir} on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no extra job-runner workers
    try:
        return subprocess.run(command, env=env, check=False).returncode
    except KeyboardInterrupt:
        return 0
