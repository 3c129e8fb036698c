"""Bad inputs this battery adds to the per-module ones (tests/reliability/README.md lists them all).

Each: a message naming the thing at fault, a non-zero exit from the command line, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from damformer.config import ConfigError, load_config
from damformer.engine.train import Trainer
from damformer.shards.format import ShardFormatError
from damformer.shards.manifest import MANIFEST_NAME, load_manifest
from damformer.shards.shardset import ShardSet
from tests.helpers import damformer_command, train_command

NO_EVAL = {"eval": {"interval": 0}}


def _train(overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides, *extra), capture_output=True, text=True, check=False)


def test_a_manifest_of_another_format_version_is_refused(tiny_shards, tmp_path):
    copy = tmp_path / "south"
    copy.mkdir()
    for path in tiny_shards["south"].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["format"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(
        ShardFormatError, match=r"manifest.json: shard format: expected 1, found 99; re-shard"
    ):
        load_manifest(copy)
    with pytest.raises(ShardFormatError, match="found 99"):
        ShardSet(copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # another band set: the message names what differs
        ({"model": {"bands": "rgb"}}, "made for model 'DAM-Former RGB+NIR+E+T' (model.bands: 'rgbne' in the"),
        ({"model": {"num_classes": 12}}, "holds 13 classes, model.num_classes is 12"),  # another class count
        ({"model": {"backbone": "mit_b1"}}, "made for model"),  # another encoder size
    ],
)
def test_resuming_a_checkpoint_of_another_model_is_refused(tiny_overrides, tmp_path, change, message):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, **NO_EVAL))).run(stop_after=2)
    before = (run / "checkpoint.pt").read_bytes()
    result = _train(tiny_overrides(run, **NO_EVAL, **change), "--resume")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing was overwritten


def test_a_checkpoint_of_another_model_is_refused_in_the_library_too(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, **NO_EVAL))).run(stop_after=2)
    other = Trainer(load_config(None, tiny_overrides(run, **NO_EVAL, model={"bands": "rgb"})))
    with pytest.raises(ConfigError, match=r"checkpoint.pt: made for model .* this config builds"):
        other.run(resume=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optim": {"lr": 0.1}}, "optim.lr: 0.0006 in the checkpoint, 0.1 now"),
        ({"uda": {"enabled": False}}, "uda.enabled: True in the checkpoint, False now"),  # was a traceback
        (
            {"data": {"batch_size": 3}, "run": {"seed": 4}},
            "data.batch_size: None in the checkpoint, 3 now; run.seed",
        ),
    ],
)
def test_resume_with_a_changed_config_is_refused_naming_each_key(tiny_overrides, tmp_path, change, message):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, **NO_EVAL))).run(stop_after=2)
    before = (run / "checkpoint.pt").read_bytes()
    result = _train(tiny_overrides(run, **NO_EVAL, **change), "--resume")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "only optim.max_iters, eval.*, log.*" in result.stderr and "Traceback" not in result.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_may_change_the_schedule_end_evaluation_and_logging(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, **NO_EVAL))).run(stop_after=2)
    allowed = {"optim": {"max_iters": 4}, "eval": {"interval": 2, "batch_size": 1}, "log": {"interval": 2}}
    result = Trainer(load_config(None, tiny_overrides(run, **allowed))).run(resume=True)
    assert result.iterations == 4 and result.scores is not None


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        ({"optim": {"lr": -1}}, [], "optim.lr: expected > 0.0, found -1.0"),
        ({"optim": {"weight_decay": -0.1}}, [], "optim.weight_decay: expected >= 0.0, found -0.1"),
        ({"data": {"num_workers": -1}}, [], "data.num_workers: expected >= 0, found -1"),
        ({"data": {"shuffle_buffer": 0}}, [], "data.shuffle_buffer: expected > 0, found 0"),
        ({"eval": {"batch_size": -1}}, [], "eval.batch_size: expected > 0, found -1"),
        ({"eval": {"batch_size": 0}}, [], "eval.batch_size: expected > 0, found 0"),
        ({}, ["--stop-after", "0"], "--stop-after 0: expected an iteration >= 1"),
    ],
)
def test_bad_training_values_are_one_line_before_any_compute(
    tiny_overrides, tmp_path, change, extra, message
):
    run = tmp_path / "run"
    result = _train(tiny_overrides(run, **change), *extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not run.exists()


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tiny_overrides, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = _train(tiny_overrides(tmp_path / "run"), "--output-dir", str(a_file))
    assert result.returncode == 2 and f"--output-dir {a_file}: is a file" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # was a chained double traceback
    result = _train(tiny_overrides(tmp_path / "run"), "--output-dir", "/proc/damformer-run")
    assert (
        result.returncode == 2 and "--output-dir /proc/damformer-run: cannot write in /proc" in result.stderr
    )


def test_evaluate_refuses_unlabelled_shards_and_a_zero_batch(tiny_overrides, tiny_shards, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, **NO_EVAL))).run(stop_after=1)
    evaluate = damformer_command("evaluate", "--checkpoint", str(run / "checkpoint.pt"))
    result = subprocess.run(
        [*evaluate, "--shards", str(tiny_shards["north"])], capture_output=True, text=True
    )
    assert result.returncode == 2 and "sharded without labels (--no-labels)" in result.stderr, result.stderr
    result = subprocess.run(
        [*evaluate, "--shards", str(tiny_shards["north-test"]), "--batch-size", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--batch-size 0: expected >= 1" in result.stderr, result.stderr


def test_disk_full_before_any_checkpoint_does_not_advise_resume(tiny_overrides, tmp_path):
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a checkpoint is larger

    command = [sys.executable, "-m", "damformer", "-q", "train", "/dev/null"]
    for assignment in tiny_overrides(tmp_path / "run", **NO_EVAL):
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, check=False, preexec_fn=small_files)
    assert result.returncode == 2, result.stderr
    assert "no checkpoint was written yet" in result.stderr and "run the same command again" in result.stderr
    assert "--resume" not in result.stderr
