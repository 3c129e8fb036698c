"""slurm/train.sh and slurm/shard.sh submitted to a real single-node Slurm started by these tests."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from torchrun_helpers import clean_env

from damformer.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(600)
SLURM = Path(__file__).parents[2] / "slurm"
# One node without GPUs: the script's V100 defaults overridden on the sbatch line, as a user would.
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    env = clean_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's damformer
    env.update(DAMFORMER=sys.executable, NPROC_PER_NODE="2")
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"), env)
    if isinstance(cluster, str):
        pytest.skip(cluster)
    yield cluster
    cluster.stop()


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "configs" / "slurm-study" / "tiny.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("uda: {enabled: true}\n")
    return config


def _sbatch(slurm, tmp_path: Path, *args: str, wait: bool) -> str:
    command = ["sbatch", "--parsable", f"--chdir={tmp_path}", *(["--wait"] if wait else []), *args]
    result = slurm.run(*command, timeout=300)
    assert result.returncode == 0 or wait, result.stderr
    return result.stdout.strip().split(";")[0]


def _train(tmp_path: Path, overrides: list[str]) -> list[str]:
    """slurm/train.sh CONFIG --set ... (the config file gives the MLflow experiment: slurm-study)."""
    sets = [part for assignment in overrides for part in ("--set", assignment)]
    return [str(SLURM / "train.sh"), str(_config(tmp_path)), *sets]


def test_sbatch_train_completes_with_a_checkpoint_and_an_mlflow_run(slurm, tiny_overrides, tmp_path):
    overrides = tiny_overrides(
        tmp_path / "run", optim={"max_iters": 2}, eval={"interval": 0}, log={"tracking": True}
    )
    job = _sbatch(slurm, tmp_path, *CPU_JOB, *_train(tmp_path, overrides), wait=True)
    state = slurm.job(job)
    batch_log = tmp_path / f"damformer-{job}.out"
    assert state["JobState"] == "COMPLETED", batch_log.read_text()[-3000:] if batch_log.is_file() else state
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["iteration"] == 2 and checkpoint["world_size"] == 2
    assert "1 node(s) x 2 process(es)" in batch_log.read_text()
    assert (tmp_path / "logs" / f"damformer-{job}" / "node-0.log").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-study").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert "miou" in run.data.metrics


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm, tiny_overrides, tmp_path):
    sections = {"optim": {"max_iters": 40}, "eval": {"interval": 0}, "log": {"checkpoint_interval": 1}}
    overrides = tiny_overrides(tmp_path / "run", **sections)
    job = _sbatch(slurm, tmp_path, *CPU_JOB, *_train(tmp_path, overrides), wait=False)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), "the job did not start training"
    # What --signal=B:USR1@600 does ten minutes before the time limit: USR1 to the batch shell.
    signalled = slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr
    requeued = slurm.wait_for(job, lambda j: int(j["Restarts"]) >= 1, timeout=120)
    assert int(requeued["Restarts"]) == 1, requeued
    # Slurm holds a requeued job for cred_expire seconds (10 in the test cluster) before it starts again.
    state = slurm.wait_for(
        job, lambda j: j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 1, timeout=400
    )
    batch_log = (tmp_path / f"damformer-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, (state, batch_log[-3000:])
    assert "pre-timeout signal" in batch_log and f"requeueing job {job}" in batch_log
    node_log = (tmp_path / "logs" / f"damformer-{job}" / "node-0.log").read_text()
    stopped = [line for line in node_log.splitlines() if "on request (stop file" in line]
    assert stopped, node_log[-3000:]
    assert "resumed from" in node_log
    final = load_checkpoint(checkpoint)
    assert final["iteration"] == 40 and len(final["history"]) == 40


def test_shard_job_array_writes_one_shard_set_per_domain(slurm, tiny_shards, tmp_path):
    root = tiny_shards["south"].parents[1] / "flair2"
    out = tmp_path / "shards"
    job = _sbatch(
        slurm, tmp_path, "--array=0-1", "--cpus-per-task=1", str(SLURM / "shard.sh"), str(root), str(out),
        "south", "north", "--", "--max-samples", "2", wait=True,
    )  # fmt: skip
    for index, domain in enumerate(("south", "north")):
        manifest = json.loads((out / domain / "manifest.json").read_text())
        assert manifest["num_samples"] > 0, manifest
        assert (tmp_path / f"damformer-shard-{job}_{index}.out").is_file()
    shard = [str(SLURM / "shard.sh"), str(root), str(out), "south", "north"]
    bad = _sbatch(slurm, tmp_path, "--array=2", "--cpus-per-task=1", *shard, wait=True)
    assert slurm.job(bad)["JobState"] == "FAILED"
    assert "array task 2 has no domain" in (tmp_path / f"damformer-shard-{bad}_2.out").read_text()
