"""MLflow tracking of a training run (rank 0 only), that never stops training.

Default store: one per folder of runs. A run in ``runs/demo/uda`` logs to ``runs/demo/mlflow.db`` with
artifacts in ``runs/demo/mlartifacts``, so the runs launched side by side (the demo's three, a config
family under ``runs/``) are compared in one MLflow UI (``damformer ui runs/demo``). ``--tracking-uri``
(or ``log.tracking_uri``) points at a shared server instead. Artifact locations are absolute paths in
the store: a moved folder of runs keeps its runs and metrics, but the UI no longer finds its artifacts
(they are still on disk, next to the store). One experiment per config family
(``configs/ablation/*.yaml`` -> ``ablation``), one run named after the ablation (model x inputs x
source->target), every resolved config value as a param.

Any failure of the backend (server down at start, or dying mid-run) turns tracking off with one
warning; the run goes on and its metrics stay in ``OUTPUT/history.json`` and ``scores.json``. The
HTTP client is told not to retry (MLflow retries for about 4 minutes by default, infra.md).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from damformer.tracking.store_lock import sqlite_path, store_opening

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "damformer"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 100  # params / tags per log_batch call (MLflow accepts up to 100 params)


def experiment_family(config_path: str | os.PathLike | None) -> str:
    """The experiment of a config file: its folder's name (``configs/ablation/x.yaml`` -> ``ablation``)."""
    if config_path is None:
        return DEFAULT_EXPERIMENT
    parent = Path(config_path).resolve().parent
    if str(config_path) == os.devnull or parent.name in ("", "configs", "/"):
        return DEFAULT_EXPERIMENT
    return parent.name


STORE_NAME = "mlflow.db"  # the store of a folder of runs: next to the runs' folders
ARTIFACT_ROOT = "mlartifacts"


def store_folder(output_dir: Path) -> Path:
    """Where the default store of a run lives: the folder that holds its run folder."""
    return output_dir.resolve().parent


def default_tracking_uri(output_dir: Path) -> str:
    """The sqlite store shared by the runs of ``output_dir``'s parent folder."""
    return f"sqlite:///{store_folder(output_dir) / STORE_NAME}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"data": {"batch_size": 2}}`` -> ``{"data.batch_size": "2"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit(start: Path | None = None) -> str:
    """The commit of the damformer checkout (``unknown`` for an installed package)."""
    folder = start or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def hostname() -> str:
    """This machine's name (a tag of the run, gathered from every rank)."""
    return socket.gethostname()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _damaged_store_hint(uri: str, error: str) -> str:
    """The fix, when a local store was left half-migrated (two runs migrated it at once, before the lock)."""
    database = sqlite_path(uri)
    if database is None:
        return ""
    if "out-of-date database schema" in error:  # written by an older MLflow
        return f". Back it up, then upgrade it: mlflow db upgrade sqlite:///{database}"
    if any(sign in error for sign in ("_alembic_tmp", "already exists", "Online migration")):
        return (
            f". The store was left half-migrated by an earlier run: move it aside (mv {database} "
            f"{database}.broken) and the next run creates a new one"
        )
    return ""


class Tracker:
    """One MLflow run. Every method is a no-op once tracking is off (disabled, or the backend failed).

    Args:
        uri: tracking URI (``sqlite:///...``, ``http://host:port``, ``file:...``).
        experiment: experiment name (created when missing).
        run_name: the run's display name.
        artifact_root: where a new experiment stores artifacts (local stores); None: the server's.
        run_id: continue this run (a resumed training) instead of starting one.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        artifact_root: Path | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.client: Any = None
        self.run_id: str | None = None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self._guard("start", lambda: self._start(experiment, run_name, artifact_root, run_id, tags or {}))

    @classmethod
    def off(cls) -> Tracker:
        """A tracker that logs nothing (ranks > 0, or ``log.tracking: false``)."""
        tracker = cls.__new__(cls)
        tracker.uri, tracker.client, tracker.run_id = "", None, None
        return tracker

    def _start(
        self,
        experiment: str,
        run_name: str,
        artifact_root: Path | None,
        run_id: str | None,
        tags: Mapping[str, str],
    ) -> None:
        from mlflow.tracking import MlflowClient

        # serialised: the store's schema migrations, and finding or creating the experiment
        with store_opening(self.uri):
            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            else:
                experiment_id = found.experiment_id
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        self.client, self.run_id = client, run_id
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_name, run_id, experiment, self.uri)

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        if what != "start" and self.client is None:
            return
        try:
            action()
        except Exception as exc:  # tracking must never end a training run
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning(
                "MLflow tracking at %s failed (%s: %s); training continues without it, metrics stay in "
                "the output folder (history.json, scores.json)%s",
                self.uri,
                what,
                reason[:300],
                _damaged_store_hint(self.uri, str(exc)),
            )
            self.client = None

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params not logged yet (a resumed run keeps its first values)."""
        if self.client is None:  # off: not even an import (mlflow may be missing, as on GPU nodes)
            return
        from mlflow.entities import Param

        def action() -> None:
            existing = self.client.get_run(self.run_id).data.params
            items = [Param(k, v) for k, v in params.items() if k not in existing]  # a resumed run keeps them
            for chunk in _chunks(items, BATCH_LIMIT):
                self.client.log_batch(self.run_id, params=chunk)

        self._guard("params", action)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags."""
        if self.client is None:
            return
        from mlflow.entities import RunTag

        def action() -> None:
            for chunk in _chunks([RunTag(k, str(v)) for k, v in tags.items()], BATCH_LIMIT):
                self.client.log_batch(self.run_id, tags=chunk)

        self._guard("tags", action)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metric values at ``step`` (the iteration)."""
        if self.client is None:
            return
        import math
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if math.isfinite(float(v))]

        def action() -> None:
            for chunk in _chunks(items, 1000):
                self.client.log_batch(self.run_id, metrics=chunk)

        self._guard("metrics", action)

    def start_system_metrics(self, interval: float = 30.0) -> None:
        """MLflow's own sampling of CPU, memory and (with pynvml) GPU use, every ``interval`` s."""

        def action() -> None:
            import mlflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(self.uri)  # the monitor logs through the global client
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, samples_before_logging=1)
            monitor.start()
            self._monitor = monitor

        self._guard("system metrics", action)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Upload a file into the run's artifacts (under ``folder``)."""
        self._guard("artifact", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended (FINISHED, FAILED or KILLED); stop the system-metrics sampling."""
        monitor = self.__dict__.pop("_monitor", None)
        if monitor is not None:
            self._guard("system metrics", monitor.finish)
        self._guard("finish", lambda: self.client.set_terminated(self.run_id, status=status))
