"""``damformer ui``: the MLflow UI over a folder of runs' local store, bound to the loopback by default.

MLflow's server has no authentication: anyone who reaches its port can read every run and delete it.
So it listens on 127.0.0.1 unless told otherwise, and a user on a cluster reaches it through an SSH
tunnel (``ssh -L 5000:127.0.0.1:5000 NODE``). The command is an argument list, never a shell string:
a run folder named ``x; rm -rf ~`` is just a strange path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import FrameType

from damformer.errors import DamformerError
from damformer.tracking.mlflow_tracker import ARTIFACT_ROOT, STORE_NAME
from damformer.tracking.store_lock import store_opening

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


def resolve_store(path: Path) -> Path:
    """The sqlite store a path names: the file itself, a folder's ``mlflow.db``, or a run folder's parent's.

    Raises:
        UIError: no store there (tracking was off, or the run tracked to another --tracking-uri).
    """
    if path.is_file():
        return path.resolve()
    candidates = [path / STORE_NAME, path.resolve().parent / STORE_NAME]  # a folder of runs, or one run
    for store in candidates:
        if store.is_file():
            return store.resolve()
    raise UIError(
        f"{path}: no MLflow store (looked for {' and '.join(str(c) for c in candidates)}): log.tracking was "
        "off, or the runs tracked to another --tracking-uri (open that server instead)"
    )


def resolve_one_store(paths: list[Path]) -> Path:
    """The one store that every path names (one server serves one store).

    Raises:
        UIError: a path has no store, or the paths name different stores.
    """
    stores = {path: resolve_store(path) for path in paths}
    distinct = sorted(set(stores.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{path} -> {store}" for path, store in stores.items())
        raise UIError(f"paths in {len(distinct)} different MLflow stores ({listing}): one at once")
    return distinct[0]


def ui_command(store: Path, *, host: str = DEFAULT_HOST, port: int = 5000) -> list[str]:
    """The ``mlflow server`` argument list for one sqlite store file."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store}",
    ]  # fmt: skip


def selected_experiment(store: Path, folders: list[Path]) -> str | None:
    """The experiment to open: the one holding the given run folders' runs, else the latest run's."""
    from mlflow.tracking import MlflowClient

    with store_opening(f"sqlite:///{store}"):  # an older store is migrated on opening
        client = MlflowClient(f"sqlite:///{store}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"])
    wanted = {str(folder.resolve()) for folder in folders if folder.resolve().parent == store.parent}
    for run in runs:
        output_dir = run.data.params.get("run.output_dir")
        if wanted and output_dir and str(Path(output_dir).resolve()) in wanted:
            return run.info.experiment_id
    return runs[0].info.experiment_id if runs else None


def relocate_artifacts(store: Path) -> int:
    """Re-point artifact locations that a moved or copied runs folder left behind; the count re-pointed.

    MLflow records artifact locations as absolute paths (``file:///old/runs/demo/mlartifacts/...``). A
    location that no longer exists, whose files sit in the ``mlartifacts`` folder beside the store, is
    rewritten to point there: the copy's UI then lists and serves its artifacts. Nothing else changes.
    """
    here = (store.parent / ARTIFACT_ROOT).resolve()
    tables = (("runs", "run_uuid", "artifact_uri"), ("experiments", "experiment_id", "artifact_location"))
    updates: list[tuple[str, str, str, object]] = []
    with store_opening(f"sqlite:///{store}"), contextlib.closing(sqlite3.connect(store)) as database:
        for table, key, column in tables:
            for row_id, location in database.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                old = str(location or "").removeprefix("file://")
                if f"/{ARTIFACT_ROOT}" not in old or Path(old).exists():
                    continue
                tail = old.split(f"/{ARTIFACT_ROOT}", 1)[1].lstrip("/")
                new = here / tail
                if new.exists():
                    updates.append((table, column, f"file://{new}", (key, row_id)))
        for table, column, value, (key, row_id) in updates:
            database.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (value, row_id))
        database.commit()
    return len(updates)


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


def serve(paths: list[Path], *, host: str = DEFAULT_HOST, port: int = 5000) -> int:
    """Run the MLflow UI of the store ``paths`` name, until Ctrl-C or SIGTERM; returns the exit code.

    The server runs in its own process group (MLflow starts worker processes): Ctrl-C and SIGTERM to
    this command stop the whole group, so no server is left listening after it.
    """
    if importlib.util.find_spec("flask") is None:  # the server's own dependencies: the "ui" extra
        raise UIError(
            "the MLflow UI needs the full mlflow (training needs only the client, mlflow-skinny): "
            "pip install 'damformer[ui]' (make demo installs it)"
        )
    store = resolve_one_store(paths)
    command = ui_command(store, host=host, port=port)
    if not is_loopback(host):
        log.warning(
            "binding the MLflow UI to %s: it has no authentication, anyone who reaches port %d can read "
            "and delete runs. Prefer the default 127.0.0.1 with an SSH tunnel",
            host,
            port,
        )
    _check_port(host, port)
    moved = relocate_artifacts(store)
    if moved:
        log.warning("%s: %d artifact location(s) pointed where the runs were before a move or copy; now to "
                    "%s beside the store", store, moved, store.parent / ARTIFACT_ROOT)  # fmt: skip
    experiment = selected_experiment(store, paths)
    shown = f"[{host}]" if ":" in host else host
    # MLflow 3 opens an experiment on its GenAI overview: "/runs" is the table of training runs
    url = f"http://{shown}:{port}/" + (f"#/experiments/{experiment}/runs" if experiment else "")
    print(f"MLflow UI of {store} on {url} (Ctrl-C stops it)", flush=True)
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
