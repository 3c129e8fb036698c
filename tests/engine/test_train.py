"""The training loop: seeded reproducibility, exact resume after a kill, baselines, errors before compute."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from damformer.cli import main
from damformer.config import ConfigError, load_config
from damformer.engine.train import Trainer
from damformer.runtime.artifacts import load_checkpoint
from damformer.shards.format import ShardFormatError
from tests.helpers.checkpoints import CheckpointWatch


def _train(overrides, **kwargs):
    trainer = Trainer(load_config(None, overrides))
    return trainer, trainer.run(**kwargs)


def test_seeded_run_reproduces_its_loss_curve(tiny_overrides, tmp_path):
    _, first = _train(tiny_overrides(tmp_path / "a"))
    _, second = _train(tiny_overrides(tmp_path / "b"))
    keys = {"loss_source", "loss_mixed", "loss_mic", "pseudo_confidence", "lr"}
    assert keys <= set(first.history[0])
    assert first.history == second.history  # exact, float for float
    assert len(first.history) == 6
    assert first.scores is not None and 0 <= first.scores.miou <= 1
    saved = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert saved["miou"] == first.scores.miou


def test_resume_continues_exactly(tiny_overrides, tmp_path):
    full, _ = _train(tiny_overrides(tmp_path / "full"))
    _, stopped = _train(tiny_overrides(tmp_path / "cut"), stop_after=4)
    assert stopped.iterations == 4 and stopped.scores is None
    resumed, result = _train(tiny_overrides(tmp_path / "cut"), resume=True)
    assert result.iterations == 6
    assert resumed.history == full.history
    for (name, a), (_, b) in zip(
        full.uda.state_dict().items(), resumed.uda.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_overrides, tmp_path):
    iterations = {"optim": {"max_iters": 12}, "eval": {"interval": 0}}
    full, _ = _train(tiny_overrides(tmp_path / "full", **iterations))
    command = [sys.executable, "-m", "damformer", "-q", "train", "/dev/null"]
    for assignment in tiny_overrides(tmp_path / "killed", **iterations):
        command += ["--set", assignment]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    watch, deadline = CheckpointWatch(checkpoint), time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if 4 <= (watch.iteration() or 0) < 10:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(checkpoint)["iteration"]
    assert killed_at < 12
    resume = subprocess.run([*command, "--resume"], capture_output=True, text=True, check=False)
    assert resume.returncode == 0, resume.stderr
    final = load_checkpoint(checkpoint)
    assert final["iteration"] == 12
    assert final["history"] == full.history
    for name, tensor in full.uda.state_dict().items():
        assert torch.equal(final["uda"][name], tensor), name


def test_source_only_baseline(tiny_overrides, tmp_path):
    trainer, result = _train(tiny_overrides(tmp_path / "s", uda={"enabled": False, "rcs": False}))
    assert trainer.uda.teacher is None and trainer.target is None
    assert set(result.history[0]) == {"loss_source", "lr", "iteration"}


def test_feature_distance_region_loss_and_aerial_only_model(tiny_overrides, tmp_path):
    from transformers import SegformerConfig, SegformerModel

    # The feature distance is to ImageNet weights: a MiT-b0 checkpoint on disk stands in for them (a model
    # without pretrained weights is refused, tests/engine/test_recipe.py).
    torch.manual_seed(0)
    SegformerModel(SegformerConfig()).save_pretrained(tmp_path / "mit_b0")
    overrides = tiny_overrides(
        tmp_path / "fd",
        model={"temporal": False, "pretrained": str(tmp_path / "mit_b0")},
        uda={"feature_distance": True, "fd_classes": list(range(13)), "region_loss": "dice"},
    )
    _, result = _train(overrides)
    assert result.history[0]["loss_feature_distance"] >= 0


def test_bad_configs_fail_before_any_compute(tiny_overrides, tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="model: unknown key"):
        load_config(None, [*tiny_overrides(tmp_path), "model.backbon=mit_b0"])
    with pytest.raises(ConfigError, match="model.arch: expected one of"):
        load_config(None, [*tiny_overrides(tmp_path), "model.arch=segnet"])
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(None, [*tiny_overrides(tmp_path), "optim.lr=fast"])
    with pytest.raises(ConfigError, match="optim: unknown key"):
        load_config(None, [*tiny_overrides(tmp_path), "optim.learning_rate=1"])
    with pytest.raises(ShardFormatError, match="nowhere: no such shard-set folder"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), f'data.source=["{tmp_path / "nowhere"}"]']))
    with pytest.raises(ConfigError, match="holds 13 classes, model.num_classes is 12"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), "model.num_classes=12"]))
    no_s2 = f'data.source=["{tiny_shards["south-no-s2"]}"]'
    with pytest.raises(ConfigError, match="has no Sentinel-2"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), no_s2]))
    unlabelled = f'data.target_test=["{tiny_shards["north"]}"]'
    with pytest.raises(ConfigError, match="sharded without labels"):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), unlabelled]))


def test_footprint_must_match_the_shards(tiny_overrides, tmp_path):
    expected = r"cover 0.032 of their 40-pixel Sentinel-2 crop .*set model.footprint=0.032"
    with pytest.raises(ConfigError, match=expected):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), "model.footprint=0.256"]))


def test_zero_intervals_and_source_warmup(tiny_overrides, tmp_path):
    sections = {"log": {"interval": 0, "checkpoint_interval": 0}, "eval": {"interval": 0}}
    _, result = _train(tiny_overrides(tmp_path / "w", uda={"source_warmup": 3}, **sections))
    assert ["loss_mixed" in h for h in result.history] == [False] * 3 + [True] * 3
    assert load_checkpoint(tmp_path / "w" / "checkpoint.pt")["iteration"] == 6  # written at the end
    assert result.scores is not None
    for bad, message in (
        ("log.checkpoint_interval=-1", "log.checkpoint_interval: expected >= 0"),
        ("uda.source_warmup=6", r"uda.source_warmup: expected 0 <= warmup < optim.max_iters \(6\)"),
        ("uda.teacher_norm=group", "uda.teacher_norm: expected batch or running"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*tiny_overrides(tmp_path), bad])


def test_existing_run_needs_resume(tiny_overrides, tmp_path):
    _train(tiny_overrides(tmp_path / "r"), stop_after=2)
    with pytest.raises(ConfigError, match="pass --resume"):
        _train(tiny_overrides(tmp_path / "r"))


def test_cli_train_and_evaluate(tiny_overrides, tiny_shards, tmp_path, capsys):
    args = ["-q", "train", "/dev/null"]
    for assignment in tiny_overrides(tmp_path / "cli", optim={"max_iters": 3}):
        args += ["--set", assignment]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "target test mIoU" in printed
    scores = json.loads((tmp_path / "cli" / "scores.json").read_text())
    checkpoint = str(tmp_path / "cli" / "checkpoint.pt")
    assert (
        main(["-q", "evaluate", "--checkpoint", checkpoint, "--shards", str(tiny_shards["north-test"])]) == 0
    )
    table = capsys.readouterr().out
    assert f"{100 * scores['miou']:.2f}" in table and "building" in table
    assert main(["-q", "train", "/dev/null", "--set", "model.arch=segnet"]) == 2
    assert "model.arch: expected one of" in capsys.readouterr().err
