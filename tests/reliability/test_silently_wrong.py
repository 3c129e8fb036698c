"""Issue 29: a diverged run fails loudly, a run folder has one writer, a study rerun notices changes, and
the remaining bad inputs are one line each (exit 2, no traceback)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest
import torch

from damformer.cli import main
from damformer.config import ConfigError, load_config
from damformer.engine.train import Trainer
from damformer.runtime.artifacts import load_checkpoint, save_checkpoint
from tests.helpers import damformer_command, train_command
from tests.helpers.training_process import start_training

pytestmark = pytest.mark.timeout(400)
QUICK = {"optim": {"max_iters": 3}, "eval": {"interval": 0}}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and text in result.stderr, result.stderr[-3000:]


def test_a_diverged_training_stops_at_once_and_keeps_its_last_good_checkpoint(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    sections = {"optim": {"max_iters": 8, "lr": 1e8, "warmup": 4}, "log": {"checkpoint_interval": 1}}
    result = _run(train_command(tiny_overrides(run, **sections, eval={"interval": 0})))
    _one_line_error(result, "training diverged: ")
    line = result.stderr.strip().splitlines()[-1]
    assert "stopped, " in line and ("the last good checkpoint" in line or "no checkpoint was written" in line)
    failure = json.loads((run / "failure.json").read_text())
    assert failure["iteration"] < 8
    if (run / "checkpoint.pt").is_file():  # whatever is on disk holds finite weights only
        state = load_checkpoint(run / "checkpoint.pt")
        assert state["iteration"] < 8 and f"(iteration {state['iteration']})" in line
        assert all(torch.isfinite(v).all() for v in state["uda"].values() if v.is_floating_point())
    compared = _run(damformer_command("compare", str(run)))
    assert compared.returncode == 0 and f"failed at iteration {failure['iteration']}" in compared.stdout


def test_predict_and_evaluate_refuse_a_checkpoint_with_non_finite_weights(
    tiny_overrides, tiny_shards, tmp_path
):
    Trainer(load_config(None, tiny_overrides(tmp_path / "good", **QUICK))).run()
    state = load_checkpoint(tmp_path / "good" / "checkpoint.pt")
    state.pop("format")
    name = next(k for k, v in state["uda"].items() if k.startswith("student.") and v.is_floating_point())
    state["uda"][name] = torch.full_like(state["uda"][name], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", state)
    shards = str(tiny_shards["north-test"])
    evaluated = _run(
        damformer_command("evaluate", "--checkpoint", str(tmp_path / "nan.pt"), "--shards", shards)
    )
    _one_line_error(evaluated, f"weight {name.removeprefix('student.')} holds NaN or infinite values")
    root = str(tiny_shards["south"].parents[1] / "flair2")
    predicted = _run(damformer_command("predict", "--checkpoint", str(tmp_path / "nan.pt"), "--src", root,
                                       "--out", str(tmp_path / "maps")))  # fmt: skip
    _one_line_error(predicted, "holds NaN or infinite values")
    assert not (tmp_path / "maps").exists()


def test_a_second_training_into_a_busy_run_folder_is_refused(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    first, _ = start_training(
        train_command(tiny_overrides(run, optim={"max_iters": 400}, eval={"interval": 0}))
    )
    try:
        second = _run(train_command(tiny_overrides(run, **QUICK), "--auto-resume"))
        _one_line_error(second, f"{run}: a training writes this folder (PID {first.pid} on ")
    finally:
        first.kill()
        first.wait()
    # the lock dies with its holder: the folder is free again
    again = _run(train_command(tiny_overrides(run, **QUICK), "--auto-resume"))
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_study_rerun_with_a_changed_setting_is_refused_then_retrained(study_file, study_sets, tmp_path):
    study = study_file(tmp_path / "grid", ["unet_t-rgbne"], seeds=[0])
    out = tmp_path / "out"
    base = ["-q", "study", str(study), "--output-dir", str(out)]
    sets = [p for s in study_sets(**{"optim.max_iters": 2, "log.tracking": False}) for p in ("--set", s)]
    assert main([*base, *sets]) == 0
    changed = _run(damformer_command(*base[1:], *sets, "--set", "optim.lr=0.001"))
    _one_line_error(changed, "unet_t-rgbne/seed-0 (optim.lr: 6e-05 then, 0.001 now)")
    assert "--retrain-changed" in changed.stderr
    again = _run(damformer_command(*base[1:], *sets, "--set", "optim.lr=0.001", "--retrain-changed"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((out / "runs" / "unet_t-rgbne").glob("seed-0.changed-*"))) == 1  # moved aside, not lost
    assert load_config(out / "runs" / "unet_t-rgbne" / "seed-0" / "config.yaml").optim.lr == 0.001


def test_evaluate_checks_the_shards_against_the_model_as_training_does(tiny_overrides, tiny_shards, tmp_path):
    from damformer.data import Flair2Dataset, SentinelOptions
    from damformer.shards import ShardWriteOptions, write_shards

    Trainer(load_config(None, tiny_overrides(tmp_path / "run", **QUICK))).run()
    root = tiny_shards["south"].parents[1] / "flair2"
    odd = tmp_path / "north-test-sat20"
    dataset = Flair2Dataset(root, domains=["north"], split="test", sentinel=SentinelOptions(crop_size=20))
    write_shards(dataset, odd, ShardWriteOptions(max_samples=4))
    command = damformer_command("evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"))
    _one_line_error(_run([*command, "--shards", str(odd)]), "cover 0.064 of their 20-pixel Sentinel-2 crop")


def test_a_global_batch_larger_than_a_set_warns(tiny_overrides, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="damformer"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), "data.global_batch=500"]))
    assert "data.global_batch 500 is larger than the" in caplog.text and "data.source" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ui", "--port", "0"], "--port 0: expected 1..65535"),
        (["ui", "--port", "99999"], "--port 99999: expected 1..65535"),
        (["synth", "--out", "/proc/damformer-synth"], "--out /proc/damformer-synth: cannot write in /proc"),
    ],
)
def test_bad_options_are_one_line(arguments, message, tmp_path):
    _one_line_error(_run(damformer_command(*arguments)), message)


def test_a_negative_seed_is_a_config_error(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="run.seed: expected >= 0, found -1"):
        load_config(None, [*tiny_overrides(tmp_path), "run.seed=-1"])


def test_a_corrupt_first_test_shard_is_refused_before_training(tiny_overrides, tiny_shards, tmp_path):
    test_set = tmp_path / "north-test"
    shutil.copytree(tiny_shards["north-test"], test_set)
    shard = sorted(test_set.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = _run(train_command(tiny_overrides(tmp_path / "run", data={"target_test": [str(test_set)]})))
    _one_line_error(result, shard.name)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
