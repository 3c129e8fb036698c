"""slurm/train.sh and slurm/shard.sh submitted to a real single-node Slurm started by these tests."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from damformer.runtime.artifacts import load_checkpoint
from tests.helpers import slurm_cluster
from tests.helpers.torchrun import clean_env

pytestmark = pytest.mark.timeout(600)
SLURM = Path(__file__).parents[2] / "slurm"
UNET_T = SLURM.parent / "configs" / "ablation" / "unet_t-rgbne.yaml"
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

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the run folder's parent's
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-study").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert "mIoU" in run.data.metrics


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
    batch_log = tmp_path / f"damformer-{job}.out"
    assert slurm.signal_batch_once(job, batch_log, "pre-timeout signal"), batch_log.read_text()[-3000:]
    requeued = slurm.wait_for(job, lambda j: int(j["Restarts"]) >= 1, timeout=120)
    assert int(requeued["Restarts"]) == 1, requeued
    # Slurm holds a requeued job for cred_expire seconds (10 in the test cluster) before it starts again.
    state = slurm.wait_for(
        job, lambda j: j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 1, timeout=400
    )
    batch_text = batch_log.read_text()
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, (state, batch_text[-3000:])
    assert batch_text.count("pre-timeout signal") == 1 and f"requeueing job {job}" in batch_text
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


def _submit_study(
    slurm, study: Path, tmp_path: Path, options: list[str], *, processes: int, cpus: int, runs: int
):
    """bash slurm/study.sh on the CPU node, PROCESSES per training; (array job id, collecting job id)."""
    trainings = [*CPU_JOB[:2], f"--cpus-per-task={cpus}", "--time=15", f"--chdir={tmp_path}"]
    trainings.append(f"--export=ALL,NPROC_PER_NODE={processes}")
    slurm.env["COLLECT_SBATCH"] = f"--cpus-per-task=1 --time=15 --chdir={tmp_path}"
    slurm.env["STUDY_POLL"] = "2"
    submitted = slurm.run(
        "bash", str(SLURM / "study.sh"), str(study), *trainings, "--", *options, timeout=120
    )
    assert submitted.returncode == 0, submitted.stderr
    array = re.search(rf"submitted job array (\d+): {runs} training", submitted.stdout).group(1)
    collect = re.search(r"submitted collecting job (\d+)", submitted.stdout).group(1)
    return array, collect


def test_study_job_array_with_a_requeued_task_equals_a_local_run(slurm, study_file, study_sets, tmp_path):
    """slurm/study.sh: 2 configs x 2 seeds as a job array + the collecting job; one task is sent the
    pre-timeout signal mid-run, checkpoints, requeues and resumes: the table equals a local run's."""
    # unet_t-rgbne trains 30 iterations, time enough to be signalled mid-run; unet_c-rgbne 3. The counts
    # sit in the study file (the command line's --set would win over an entry's).
    entries = [f"{{name: unet_t-rgbne, config: {UNET_T}, set: {{optim.max_iters: 30}}}}", "unet_c-rgbne"]
    study = study_file(tmp_path / "grid", entries, seeds=[0, 1], extra_set={"optim.max_iters": 3})
    sets = study_sets(**{"optim.max_iters": None, "log.checkpoint_interval": 1})
    study_options = ["--output-dir", str(tmp_path / "slurm-study")] + [p for s in sets for p in ("--set", s)]
    # one process per run, as the local study
    array, collect = _submit_study(slurm, study, tmp_path, study_options, processes=1, cpus=1, runs=4)

    # Task 1 (unet_t-rgbne, seed 1): the pre-timeout signal once it has a checkpoint.
    checkpoint = tmp_path / "slurm-study" / "runs" / "unet_t-rgbne" / "seed-1" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), slurm.job(f"{array}_1")
    task_log = tmp_path / f"damformer-study-{slurm.job(f'{array}_1')['JobId']}.out"
    assert slurm.signal_batch_once(f"{array}_1", task_log, "pre-timeout signal"), task_log.read_text()[-3000:]
    done = slurm.wait_for(
        collect, lambda j: j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), timeout=500
    )
    collect_log = tmp_path / f"damformer-study-collect-{collect}.out"
    assert done["JobState"] == "COMPLETED", collect_log.read_text()[-3000:] if collect_log.is_file() else done
    task = slurm.job(f"{array}_1")
    task_text = task_log.read_text()
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) == 1, (task, task_text[-3000:])
    assert task_text.count("pre-timeout signal") == 1
    node_log = (tmp_path / "logs" / f"damformer-study-{task['JobId']}" / "node-0.log").read_text()
    assert "on request (stop file" in node_log and "resumed from" in node_log

    local = subprocess.run(
        [sys.executable, "-m", "damformer", "-q", "study", str(study), "--jobs", "2",
         "--output-dir", str(tmp_path / "local-study"), *study_options[2:]],
        capture_output=True, text=True, check=False, env=slurm.env,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    table = (tmp_path / "slurm-study" / "results.csv").read_text()
    assert table.count("\n") == 3 and ",2,2," in table  # two configurations, 2 of 2 seeds each
    assert table == (tmp_path / "local-study" / "results.csv").read_text()


def test_study_trainings_keep_the_configs_global_batch_on_two_ranks(slurm, study_file, study_sets, tmp_path):
    """slurm/study.sh with two processes per training (a 2-GPU allocation's shape): the cell that states
    a global batch of 2 trains with 2 (1 per rank); the one that states 3 stops at start, naming the
    process counts that can split it."""
    entries = [
        f"{{name: two, config: {UNET_T}, set: {{data.global_batch: 2}}}}",
        f"{{name: three, config: {UNET_T}, set: {{data.global_batch: 3}}}}",
    ]
    study = study_file(tmp_path / "batch", entries, seeds=[0])
    sets = study_sets(**{"optim.max_iters": 2, "log.tracking": False})
    options = ["--output-dir", str(tmp_path / "out"), *[p for s in sets for p in ("--set", s)]]
    array, _ = _submit_study(slurm, study, tmp_path, options, processes=2, cpus=2, runs=2)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    two = slurm.wait_for(f"{array}_0", lambda j: j["JobState"] in ended, timeout=300)
    three = slurm.wait_for(f"{array}_1", lambda j: j["JobState"] in ended, timeout=300)
    logs = {name: tmp_path / "logs" / f"damformer-study-{job['JobId']}" / "node-0.log" for name, job in
            (("two", two), ("three", three))}  # fmt: skip
    assert two["JobState"] == "COMPLETED", logs["two"].read_text()[-3000:]
    checkpoint = load_checkpoint(tmp_path / "out" / "runs" / "two" / "seed-0" / "checkpoint.pt")
    assert checkpoint["world_size"] == 2 and checkpoint["global_batch"] == 2
    assert "global batch 2 source + 2 target per optimiser step (data.global_batch) = 1 per process x 2" in (
        logs["two"].read_text()
    )
    assert three["JobState"] == "FAILED"
    assert (
        "data.global_batch 3 (source samples per optimiser step, the target as many) cannot be split over 2 "
        "processes (1.5 each). Ways out: train on 1, 3 process(es)" in logs["three"].read_text()
    )
    assert not (tmp_path / "out" / "runs" / "three" / "seed-0" / "checkpoint.pt").exists()
