"""Stop requests (Slurm's pre-timeout signal, a stop file): checkpoint, stop, and resume exactly."""

import os
import signal
import subprocess
import time

import pytest
import torch

from damformer.config import load_config
from damformer.engine.train import Trainer
from damformer.runtime.artifacts import load_checkpoint
from tests.helpers.torchrun import EQUIVALENT, clean_env, standalone, torchrun

pytestmark = pytest.mark.timeout(300)


def test_stop_file_checkpoints_and_resume_equals_uninterrupted(tiny_overrides, tmp_path, monkeypatch):
    sections = {**EQUIVALENT, "optim": {"max_iters": 5}, "log": {"checkpoint_interval": 0}}
    Trainer(load_config(None, tiny_overrides(tmp_path / "full", **sections))).run()
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("DAMFORMER_STOP_FILE", str(stop_file))
    overrides = tiny_overrides(tmp_path / "split", **sections)
    trainer = Trainer(load_config(None, overrides))
    step = trainer.step

    def step_then_ask_to_stop():
        metrics = step()
        if trainer.iteration == 2:
            stop_file.touch()  # what slurm/train.sh does on the pre-timeout signal
        return metrics

    trainer.step = step_then_ask_to_stop
    result = trainer.run()
    assert result.stopped == f"stop file {stop_file}" and result.iterations == 2 and result.scores is None
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["iteration"] == 2
    stop_file.unlink()
    assert Trainer(load_config(None, overrides)).run(resume=True).iterations == 5
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert resumed["history"] == full["history"]
    for name, tensor in full["uda"].items():
        assert torch.equal(resumed["uda"][name], tensor), name


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tiny_overrides, tmp_path):
    sections = {**EQUIVALENT, "optim": {"max_iters": 200}, "log": {"checkpoint_interval": 1}}
    launcher = subprocess.Popen(
        torchrun(standalone(), tiny_overrides(tmp_path / "run", **sections)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    checkpoint, deadline = tmp_path / "run" / "checkpoint.pt", time.monotonic() + 120
    try:
        while not checkpoint.is_file() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        pids = sorted(int(pid) for pid in workers.stdout.split())
        assert len(pids) == 2, "the workers are not running"
        os.kill(pids[-1], signal.SIGUSR1)  # one rank only
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            subprocess.run(["pkill", "-KILL", "-P", str(launcher.pid)], check=False)
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, err[-3000:]
    assert "on request (a request on another rank)" in out or "on request (SIGUSR1)" in out
    state = load_checkpoint(checkpoint)
    assert 1 <= state["iteration"] < 200 and len(set(state["student_digests"])) == 1
