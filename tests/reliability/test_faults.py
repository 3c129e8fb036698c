"""Faults: a kill during a checkpoint write, SIGTERM, a full disk, a tracking server that dies mid-run.

Each runs the real `damformer` command in a child process and breaks it for real (signals, a file size
limit, a killed server). Kills of one rank under torchrun and of the sharder live beside the code they
test; tests/reliability/README.md maps every guarantee to its test.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from damformer.config import load_config
from damformer.engine.train import Trainer
from damformer.runtime.artifacts import CheckpointError, load_checkpoint
from damformer.shards.writer import verify_shards
from tests.helpers import damformer_command, free_port, train_command
from tests.helpers.training_process import start_training

pytestmark = pytest.mark.timeout(400)
NO_EVAL = {"eval": {"interval": 0}}


def _limit_file_size(limit: int) -> Callable[[], None]:
    """A preexec_fn: no file this process writes may grow past ``limit`` bytes (EFBIG: "disk full")."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".checkpoint.pt.tmp-*"))


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tiny_overrides, tmp_path):
    sections = {**NO_EVAL, "optim": {"max_iters": 10}, "log": {"checkpoint_interval": 1}}
    full = Trainer(load_config(None, tiny_overrides(tmp_path / "full", **sections)))
    full.run()
    run = tmp_path / "killed"
    overrides = tiny_overrides(run, **sections)
    process = subprocess.Popen(train_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = run / "checkpoint.pt"
    caught = []
    deadline = time.monotonic() + 240
    # Wait for a write after the first complete checkpoint, and kill the writer in the middle of it
    # (the temporary exists only between open and rename).
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.is_file() and (caught := _temporaries(run)):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()
    assert caught and process.returncode == -signal.SIGKILL, "no checkpoint write was caught in flight"

    previous = load_checkpoint(checkpoint)  # complete, CRC-checked: the one before the cut-off write
    assert previous["iteration"] < 10
    leftovers = _temporaries(run)
    if leftovers:  # the kill landed before the rename: a half-written file is never read as a checkpoint
        with pytest.raises(CheckpointError, match="incomplete|CRC"):
            load_checkpoint(leftovers[0])
    resumed = subprocess.run(
        train_command(overrides, "--resume"), capture_output=True, text=True, check=False, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not _temporaries(run)
    if leftovers:
        assert "a checkpoint write that was cut off" in resumed.stderr
    final = load_checkpoint(checkpoint)
    assert final["iteration"] == 10 and final["history"] == full.history
    for name, tensor in full.uda.state_dict().items():
        assert torch.equal(final["uda"][name], tensor), name


def test_truncated_or_corrupted_checkpoints_are_refused_by_name(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **NO_EVAL)
    Trainer(load_config(None, overrides)).run(stop_after=2)
    checkpoint = run / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # what a non-atomic writer would leave
    with pytest.raises(CheckpointError, match="incomplete or not a damformer checkpoint"):
        load_checkpoint(checkpoint)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # a flipped bit inside a tensor record: torch alone would load it
    checkpoint.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_checkpoint(checkpoint)
    command = train_command(overrides, "--resume")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{checkpoint}: record" in result.stderr and "CRC-32" in result.stderr


def test_sigterm_saves_a_checkpoint_in_bounded_time_and_exits_75(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    sections = {**NO_EVAL, "optim": {"max_iters": 200}, "log": {"checkpoint_interval": 1000}}
    overrides = tiny_overrides(run, **sections)
    process, header = start_training(train_command(overrides))
    time.sleep(4)  # a few steps in
    assert process.poll() is None, process.stderr.read()
    assert not (run / "checkpoint.pt").is_file()  # the next checkpoint would only come at 1000
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest, err = process.communicate(timeout=60)
    out = header + rest
    elapsed = time.monotonic() - signalled
    assert process.returncode == 75, err  # EX_TEMPFAIL: "resume me"
    assert elapsed < 30, f"took {elapsed:.1f} s to stop"  # one step + one checkpoint, not the 200 left
    stopped_at = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert 0 < stopped_at < 200 and "stopped at iteration" in out and "SIGTERM" in out
    assert "Traceback" not in err


def test_a_process_that_dies_in_native_code_shows_its_python_stack(tiny_overrides, tmp_path):
    """SIGABRT (what a C++ std::terminate raises): the dying rank says where its Python stood."""
    overrides = tiny_overrides(tmp_path / "run", **NO_EVAL, optim={"max_iters": 200})
    process, _ = start_training(train_command(overrides))
    time.sleep(1)
    process.send_signal(signal.SIGABRT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "Current thread" in err, err[-2000:]
    assert "damformer/engine/train.py" in err, err[-2000:]  # the stack of the training loop


def test_the_trainer_is_released_before_the_process_group_is_destroyed(tiny_overrides, tmp_path, monkeypatch):
    """A DDP model alive at interpreter exit keeps a gloo group alive: ranks could abort at exit."""
    import weakref

    from damformer import cli
    from damformer.engine import train
    from damformer.runtime import distributed

    trainers: list[weakref.ref] = []
    alive_at_teardown: list[int] = []

    class RecordedTrainer(train.Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(weakref.ref(self))

    real_teardown = distributed.teardown

    def teardown(context, *, wait=True):
        alive_at_teardown.append(sum(ref() is not None for ref in trainers))
        real_teardown(context, wait=wait)

    monkeypatch.setattr(train, "Trainer", RecordedTrainer)
    monkeypatch.setattr(distributed, "teardown", teardown)
    arguments = ["-q", "train", "/dev/null"]
    for assignment in tiny_overrides(tmp_path / "run", **NO_EVAL, optim={"max_iters": 1}):
        arguments += ["--set", assignment]
    assert cli.main(arguments) == 0
    assert len(trainers) == 1 and alive_at_teardown == [0]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **NO_EVAL)  # checkpoints every 2 iterations, 6 in all
    Trainer(load_config(None, overrides)).run(stop_after=2)
    checkpoint = run / "checkpoint.pt"
    before = checkpoint.read_bytes()
    result = subprocess.run(
        train_command(overrides, "--resume"),
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_limit_file_size(len(before) // 2),
    )
    assert result.returncode == 2, result.stderr
    assert f"{checkpoint}: cannot write the checkpoint" in result.stderr
    assert "the previous checkpoint is kept" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint.read_bytes() == before and load_checkpoint(checkpoint)["iteration"] == 2
    assert not _temporaries(run)
    # Space is back: the same command resumes from the kept checkpoint and finishes.
    again = subprocess.run(train_command(overrides, "--resume"), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(checkpoint)["iteration"] == 6


def test_disk_full_while_sharding_keeps_the_complete_shards(tiny_root, tmp_path):
    out = tmp_path / "shards"
    command = damformer_command("shard", "--root", str(tiny_root), "--out", str(out), "--domains", "south")
    command += ["--max-samples", "1"]
    first = subprocess.run(command, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 2
    kept = {tar.name: tar.read_bytes() for tar in tars[1:]}
    tars[0].unlink()  # one shard to write again, the other complete and verified
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, preexec_fn=_limit_file_size(4096)
    )
    assert result.returncode == 2, result.stderr
    assert f"{tars[0]}: cannot write (File too large)" in result.stderr
    assert "the shards already complete are kept" in result.stderr and "Traceback" not in result.stderr
    assert {tar.name: tar.read_bytes() for tar in out.glob("*.tar")} == kept
    assert not list(out.glob(".*tmp*"))  # no partial file anywhere
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert "1 written, 1 already complete" in again.stdout
    assert verify_shards(out)["samples"] == 2


def _mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--default-artifact-root", str(folder / "artifacts")]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not answer /health in 90 s")


def _logged_steps(port: int) -> int:
    """The highest metric step of the first run on the server (0 when none, or unreachable)."""
    try:
        search = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 10}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(search, timeout=5) as response:
            ids = [e["experiment_id"] for e in json.loads(response.read()).get("experiments", [])]
        body = json.dumps({"experiment_ids": ids, "max_results": 5}).encode()
        runs = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(runs, timeout=5) as response:
            found = json.loads(response.read()).get("runs", [])
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0
    metrics = found[0]["data"].get("metrics", []) if found else []
    return max((int(m.get("step", 0)) for m in metrics), default=0)


def test_tracking_server_dying_mid_run_does_not_stop_training(tiny_overrides, tmp_path):
    port = free_port()
    server_folder = tmp_path / "server"
    server_folder.mkdir()
    server = _mlflow_server(server_folder, port)
    run = tmp_path / "run"
    sections = {**NO_EVAL, "optim": {"max_iters": 20}, "log": {"tracking": True, "checkpoint_interval": 20}}
    overrides = tiny_overrides(run, **sections)
    command = train_command(overrides, "--tracking-uri", f"http://127.0.0.1:{port}")
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None and _logged_steps(port) < 2:
            time.sleep(0.5)
        assert process.poll() is None, "training ended before the server could be killed"
        assert _logged_steps(port) >= 2, "the server never received metrics"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "MLflow tracking at" in err and "training continues without it" in err
    assert "history.json" in err  # the user is told where the metrics are
    history = json.loads((run / "history.json").read_text())
    assert [entry["iteration"] for entry in history] == list(range(20))  # every metric kept locally
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 20
