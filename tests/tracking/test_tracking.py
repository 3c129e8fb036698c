"""MLflow tracking: a real server receives a run, a dead server costs seconds, the local store resumes."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damformer.config import load_config
from damformer.engine.metrics import metric_interval
from damformer.engine.train import Trainer
from damformer.eval.figures import confusion_png
from damformer.shards.tario import sha256_file
from damformer.tracking.mlflow_tracker import experiment_family
from tests.helpers import free_port
from tests.helpers.torchrun import clean_env

pytestmark = pytest.mark.timeout(300)
QUICK = {"optim": {"max_iters": 2}, "eval": {"interval": 0}, "log": {"tracking": True}}


def _api(base: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store (stopped by process group)."""
    port = free_port()
    env = dict(clean_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    store = tmp_path / "server"
    store.mkdir()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    command += ["--default-artifact-root", str(store / "artifacts")]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not answer /health within 90 s")
    yield base
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_a_real_server_receives_params_metrics_and_artifacts(mlflow_server, tiny_overrides, tmp_path):
    config = tmp_path / "configs" / "north-study" / "damformer.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("uda: {enabled: true}\n")
    command = [sys.executable, "-m", "damformer", "-q", "train", str(config), "--tracking-uri", mlflow_server]
    for assignment in tiny_overrides(tmp_path / "run", **QUICK):
        command += ["--set", assignment]
    result = subprocess.run(
        command, capture_output=True, text=True, env=clean_env(), timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MLflow tracking" not in result.stderr, result.stderr  # no failure warning

    experiments = _api(mlflow_server, "experiments/search", {"max_results": 10})["experiments"]
    family = next(e for e in experiments if e["name"] == "north-study")  # the config's folder
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [family["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"].startswith("UDA: DAM-Former RGB+NIR+E+T south->north")  # training first
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["data.batch_size"] == "2" and params["model.arch"] == "damformer"
    assert params["optim.max_iters"] == "2" and params["uda.mic"] == "True"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["world_size"] == "1" and tags["engine"] == "single" and tags["precision"] == "fp32"
    assert (tags["hostnames"] and len(tags["git_commit"]) in (7, 40)) or tags["git_commit"] == "unknown"
    run_id = run["info"]["run_id"]
    history = _api(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="loss_source")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    latest = {m["key"]: m for m in run["data"]["metrics"]}
    assert {"lr", "pseudo_confidence", "throughput samples/s", "mIoU", "mIoU without other"} <= set(latest)
    assert any(key.startswith("IoU/") for key in latest)
    assert latest["mIoU"]["value"] == pytest.approx(
        100 * json.loads((tmp_path / "run" / "scores.json").read_text())["miou"]  # in percent
    )
    listed = {f["path"] for f in _api(mlflow_server, "artifacts/list", run_id=run_id).get("files", [])}
    assert {"config.yaml", "history.json", "figures"} <= listed and "checkpoint" not in listed
    figures = _api(mlflow_server, "artifacts/list", run_id=run_id, path="figures")["files"]
    expected = {
        "confusion_matrix.png",
        "confusion_matrix.pdf",
        "confusion_matrix.svg",
        "prediction_mosaic.png",
    }
    assert {f["path"] for f in figures} == {
        f"figures/{name}" for name in expected
    }  # vector copies for papers
    assert all(int(f["file_size"]) > 5000 for f in figures)


def test_a_dead_tracking_server_costs_seconds_not_minutes(tiny_overrides, tmp_path, caplog):
    def timed(name: str, **log) -> float:
        sections = {**QUICK, "log": {**QUICK["log"], **log}}
        trainer = Trainer(load_config(None, tiny_overrides(tmp_path / name, **sections)))
        started = time.perf_counter()
        trainer.run()
        return time.perf_counter() - started

    untracked = timed("off", tracking=False)
    dead = timed("dead", tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert dead - untracked < 15, f"a dead tracking server added {dead - untracked:.1f} s"
    assert "MLflow tracking at http://127.0.0.1" in caplog.text and "training continues" in caplog.text
    assert (tmp_path / "dead" / "scores.json").is_file() and (tmp_path / "dead" / "history.json").is_file()


def test_local_store_by_default_and_a_resumed_run_continues_its_mlflow_run(tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = tiny_overrides(tmp_path / "run", **{**QUICK, "optim": {"max_iters": 3}})
    Trainer(load_config(None, overrides)).run(stop_after=1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the parent folder's store
    (run,) = client.search_runs([client.get_experiment_by_name("damformer").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["damformer.stopped_at"] == "1"
    Trainer(load_config(None, overrides)).run(resume=True)
    (resumed,) = client.search_runs([client.get_experiment_by_name("damformer").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_source")]
    assert sorted(steps) == [1, 2, 3]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts next to the store, not in the cwd
    for name in ("confusion_matrix.png", "prediction_mosaic.png"):
        with Image.open(tmp_path / "run" / name) as image:
            assert image.format == "PNG" and min(image.size) > 300


def test_tracked_losses_are_interval_means_of_the_history(tiny_overrides, tmp_path):
    """MLflow holds one point per interval, the mean of the steps' losses (as history.json keeps them);
    a source-only run logs no inactive uda.* value, and the run says what its metrics' units are."""
    from mlflow.tracking import MlflowClient

    sections = {**QUICK, "optim": {"max_iters": 6}, "log": {**QUICK["log"], "metric_interval": 2}}
    Trainer(load_config(None, tiny_overrides(tmp_path / "run", **sections))).run()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("damformer").experiment_id])
    for key in ("loss_source", "loss_mixed"):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in points] == [2, 4, 6], key
        for step, value in points:
            interval = [entry[key] for entry in history if step - 2 <= entry["iteration"] < step]
            assert len(interval) == 2 and value == pytest.approx(np.mean(interval)), (key, step)
    assert "percent" in run.data.tags["mlflow.note.content"]
    source_only = {**sections, "uda": {"enabled": False}}
    Trainer(load_config(None, tiny_overrides(tmp_path / "source", **source_only))).run()
    runs = client.search_runs([client.get_experiment_by_name("damformer").experiment_id])
    params = next(r for r in runs if r.info.run_name.startswith("source only: ")).data.params
    assert params["uda.enabled"] == "False" and not [
        k for k in params if k.startswith("uda.") and k != "uda.enabled"
    ]
    # the demo's config: about 100 points a run (600 iterations), a readable curve
    demo = load_config(Path(__file__).parents[2] / "configs" / "demo" / "damformer.yaml", check_files=False)
    every = metric_interval(configured=demo.log.metric_interval, max_iters=demo.optim.max_iters)
    assert demo.optim.max_iters // every >= 50


def test_experiment_family_and_confusion_png(tmp_path):
    assert experiment_family("configs/ablation/damformer-rgb.yaml") == "ablation"
    assert experiment_family(os.devnull) == "damformer" and experiment_family(None) == "damformer"
    from damformer.data.classes import FLAIR_CLASSES

    matrix = [[5 if i == j else 1 for j in range(13)] for i in range(13)]
    path = confusion_png(np.array(matrix), FLAIR_CLASSES, tmp_path / "c.png", title="t")
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_runs_side_by_side_share_one_store_for_compare_and_the_ui(tiny_overrides, tmp_path):
    """Two trainings with no tracking option land in their parent folder's store, read as a user would."""
    from damformer.cli import main

    for name, uda in (("source_only", False), ("uda", True)):
        sections = {**QUICK, "uda": {"enabled": uda}, "log": {"tracking": True, "experiment": "study"}}
        Trainer(load_config(None, tiny_overrides(tmp_path / name, **sections))).run()
    folders = [str(tmp_path / "source_only"), str(tmp_path / "uda")]
    result = subprocess.run(
        [sys.executable, "-m", "damformer", "compare", *folders], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:7] == ["run", "model", "inputs", "training", "status", "mIoU", "acc"]
    miou = json.loads((tmp_path / "uda" / "scores.json").read_text())["miou"]
    uda_line = next(line for line in lines if line.startswith("uda "))
    assert "DAM-Former" in uda_line and "rgbne+T  UDA" in uda_line and f"{100 * miou:.1f}" in uda_line
    assert "source only" in next(line for line in lines if line.startswith("source_only "))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # both runs' default store: their parent folder's
    from_mlflow = subprocess.run(
        [sys.executable, "-m", "damformer", "compare", "--tracking-uri", uri, "--experiment", "study"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert from_mlflow.returncode == 0, from_mlflow.stderr
    assert "DAM-Former RGB+NIR+E+T" in from_mlflow.stdout and f"{100 * miou:.1f}" in from_mlflow.stdout
    assert main(["compare", str(tmp_path / "nowhere")]) == 2  # a clear error, not a traceback
    missing = subprocess.run(
        [sys.executable, "-m", "damformer", "compare", "--tracking-uri", uri, "--experiment", "other"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "no experiment 'other' (there: " in missing.stderr
    nowhere = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["compare", "--tracking-uri", f"sqlite:///{nowhere}"]) == 2  # read, never created
    assert not nowhere.parent.exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["run.output_dir"] for r in runs) == sorted(folders)  # one experiment, both
    for run in runs:
        folder = Path(run.data.params["run.output_dir"])
        scores = json.loads((folder / "scores.json").read_text())
        assert run.data.params["optim.max_iters"] == "2" and run.info.status == "FINISHED"
        assert run.data.metrics["mIoU"] == pytest.approx(100 * scores["miou"])  # percent, as tables print
        assert run.data.metrics["accuracy"] == pytest.approx(100 * scores["accuracy"])
        assert all(0 <= v <= 100 for k, v in run.data.metrics.items() if k.startswith("IoU/"))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.json", "figures"} <= artifacts and "checkpoint" not in artifacts
        assert run.data.tags["checkpoint.sha256"] == sha256_file(folder / "checkpoint.pt")  # a reference
    assert (tmp_path / "mlartifacts").is_dir() and not list(tmp_path.glob("*/mlflow.db"))

    with _ui(tmp_path) as (base, announced):
        runs_page = f"{base}/#/experiments/{experiment.experiment_id}/runs"
        assert runs_page in announced, announced
        served = _api(base, "runs/search", {"experiment_ids": [experiment.experiment_id]})
        assert len(served["runs"]) == 2
        listed = _api(base, "artifacts/list", run_id=runs[0].info.run_id).get("files", [])
        assert "figures" in {f["path"] for f in listed}

    # The folder of runs copied elsewhere and the original deleted: the copy's UI still lists and serves
    # every run's artifacts (their absolute locations are re-pointed to the copy's mlartifacts).
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    shutil.rmtree(tmp_path)
    with _ui(moved) as (base, _):
        for run in runs:
            listed = _api(base, "artifacts/list", run_id=run.info.run_id).get("files", [])
            assert {"config.yaml", "history.json", "figures"} <= {f["path"] for f in listed}, run.info.run_id
            query = urllib.parse.urlencode({"path": "config.yaml", "run_uuid": run.info.run_id})
            with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
                assert b"model:" in response.read()


@contextlib.contextmanager
def _ui(folder: Path):
    """``damformer ui FOLDER`` on a free port, once it answers: (its base URL, its announced line)."""
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "damformer", "ui", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), start_new_session=True,
    )  # fmt: skip
    try:
        announced = ui.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                _api(base, "experiments/search", {"max_results": 1})
                break
            except (urllib.error.URLError, ConnectionError):
                assert ui.poll() is None and time.monotonic() < deadline, ui.stderr.read()
                time.sleep(0.5)
        yield base, announced
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        assert ui.wait(timeout=30) == 0  # Ctrl-C / SIGTERM stop the server group cleanly


_OPEN_STORE = """
import sys, time
from pathlib import Path
from damformer.tracking.mlflow_tracker import Tracker
store, name, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))  # every process opens the new store at the same moment
tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}", "demo", name, artifact_root=store / "mlartifacts")
tracker.log_metrics({"mIoU": 1.0}, step=1)
tracker.finish()
sys.exit(0 if tracker.run_id else 1)
"""


def test_runs_started_together_create_one_store_without_corrupting_it(tmp_path):
    """The demo starts two trainings at once on a folder without a store: both must be tracked.

    Unserialised, the two processes run MLflow's schema migrations on the same new sqlite file at the
    same time; one fails ('table _alembic_tmp_metrics already exists') and leaves the store unusable.
    """
    start_at = time.time() + 8  # after the imports of every process
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_STORE, str(tmp_path), f"run {index}", str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        for index in range(3)
    ]
    outputs = [process.communicate(timeout=180)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and "failed" not in output, output[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["run 0", "run 1", "run 2"]
    assert all(run.data.metrics["mIoU"] == 1.0 for run in runs)


def test_a_damaged_or_old_store_is_named_with_its_fix():
    from damformer.tracking.mlflow_tracker import _damaged_store_hint

    uri = "sqlite:////data/runs/mlflow.db"
    # the errors the unlocked demo's runs met on their half-migrated store (runs/demo/*.log)
    for error in (
        "(sqlite3.OperationalError) table _alembic_tmp_latest_metrics already exists",
        "Online migration expected to match one row when updating '90e64c465722' to '181f10493468'",
    ):
        assert "mv /data/runs/mlflow.db /data/runs/mlflow.db.broken" in _damaged_store_hint(uri, error)
    old = "Detected out-of-date database schema (found version 1, but expected 2)"
    assert "mlflow db upgrade sqlite:////data/runs/mlflow.db" in _damaged_store_hint(uri, old)
    assert _damaged_store_hint(uri, "database is locked") == ""
    assert _damaged_store_hint("http://127.0.0.1:5000", "table x already exists") == ""


# What only the full mlflow (the "ui" extra: its server) brings; a training must not need any of it.
SERVER_ONLY = (
    "flask",
    "flask_cors",
    "gunicorn",
    "pandas",
    "pyarrow",
    "sklearn",
    "scipy",
    "docker",
    "graphene",
)


def test_training_tracks_to_a_local_store_without_the_ui_extra(tiny_overrides, tmp_path):
    """As after pip install damformer (no [ui]): the server's packages cannot be imported, the training
    still logs its run to the local sqlite store, and damformer ui says what to install."""
    overrides = tiny_overrides(tmp_path / "run", **QUICK)
    blocked = (
        f"import sys\nfor name in {SERVER_ONLY!r}: sys.modules[name] = None  # any import of them fails\n"
    )
    train = blocked + (
        "from damformer.cli import main\n"
        f"sys.exit(main({['-q', 'train', '/dev/null', *[p for o in overrides for p in ('--set', o)]]!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", train], capture_output=True, text=True, check=False, env=clean_env()
    )
    assert result.returncode == 0 and "MLflow tracking" not in result.stderr, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("damformer").experiment_id])
    assert run.info.status == "FINISHED" and "mIoU" in run.data.metrics
    ui = blocked + f"from damformer.cli import main\nsys.exit(main(['ui', {str(tmp_path)!r}]))"
    result = subprocess.run([sys.executable, "-c", ui], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "pip install 'damformer[ui]'" in result.stderr, result.stderr
