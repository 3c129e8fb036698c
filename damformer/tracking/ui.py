"""``damformer ui``: the MLflow UI over one run folder's local store, bound to the loopback by default.

MLflow's server has no authentication: anyone who reaches its port can read every run and delete it.
So it listens on 127.0.0.1 unless told otherwise, and a user on a cluster reaches it through an SSH
tunnel (``ssh -L 5000:127.0.0.1:5000 NODE``). The command is an argument list, never a shell string:
a run folder named ``x; rm -rf ~`` is just a strange path.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

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


def _check_port(host: str, port: int) -> None:
    """The port must be free: MLflow's own message for a busy port is buried among its start-up lines."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UIError(
                f"port {port} on {host} is not free ({exc.strerror}): another server runs there; pass "
                "--port with a free one"
            ) from None


def serve(run_dir: Path, *, host: str = DEFAULT_HOST, port: int = 5000) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C or SIGTERM; returns the server's exit code.

    The server runs in its own process group (MLflow starts worker processes): Ctrl-C and SIGTERM to
    this command stop the whole group, so no server is left listening after it.
    """
    command = ui_command(run_dir, host=host, port=port)
    if not is_loopback(host):
        log.warning(
            "binding the MLflow UI to %s: it has no authentication, anyone who reaches port %d can read "
            "and delete runs. Prefer the default 127.0.0.1 with an SSH tunnel",
            host,
            port,
        )
    _check_port(host, port)
    print(f"MLflow UI of {run_dir} on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no extra job-runner workers
    server = subprocess.Popen(command, env=env, start_new_session=True)
    stopping: list[int] = []

    def stop(number: int, _frame: FrameType | None) -> None:
        stopping.append(number)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = server.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if stopping:
            with contextlib.suppress(ProcessLookupError):  # workers that outlive their master
                os.killpg(server.pid, signal.SIGKILL)
            return 0
        if code != 0:
            raise UIError(f"the MLflow server stopped with exit code {code} (its messages are above)")
        return code
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
