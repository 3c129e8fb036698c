"""Bad inputs this battery adds to the per-module ones (tests/reliability/README.md lists them all).

Each: a message naming the thing at fault, a non-zero exit from the command line, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from damformer.config import ConfigError, load_config
from damformer.data.loader import ShardSet
from damformer.data.manifest import MANIFEST_NAME, load_manifest
from damformer.data.shard_format import ShardFormatError
from damformer.engine.train import Trainer

NO_EVAL = {"eval": {"interval": 0}}


def _train(overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "damformer", "-q", "train", "/dev/null", *extra]
    for assignment in overrides:
        command += ["--set", assignment]
    return subprocess.run(command, capture_output=True, text=True, check=False)


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
            "data.batch_size: 2 in the checkpoint, 3 now; run.seed",
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
