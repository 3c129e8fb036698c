"""The recipe a config states: its global batch on any number of processes, ablation rows that measure
what they are named, every shard set checked against the model, and the paper's study as shipped."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from damformer.cli import main
from damformer.config import ConfigError, load_config
from damformer.config.batch import BatchPlan, plan_batch
from damformer.data import Flair2Dataset, SentinelOptions
from damformer.engine.train import Trainer
from damformer.miniature.synth import generate
from damformer.runtime.artifacts import load_checkpoint
from damformer.shards.writer import ShardWriteOptions, write_shards
from tests.conftest import TRAIN_OPTIONS

ROOT = Path(__file__).parents[2]
PAPER_CELL = ROOT / "configs" / "ablation" / "damformer-rgbne-t.yaml"


def _plan(global_batch, world, *, batch_size=None, grad_accum=1) -> BatchPlan:
    return plan_batch(
        global_batch=global_batch, batch_size=batch_size, grad_accum=grad_accum, world_size=world
    )


def test_a_stated_global_batch_splits_over_the_processes_or_is_refused():
    assert (_plan(2, 1).micro_batch, _plan(2, 1).accumulation) == (2, 1)
    assert (_plan(2, 2).micro_batch, _plan(2, 2).accumulation, _plan(2, 2).global_batch) == (1, 1, 2)
    with pytest.raises(
        ConfigError, match=r"data.global_batch 2 .* cannot be split over 4 processes \(0.5 each\)"
    ):
        _plan(2, 4)
    with pytest.raises(ConfigError, match=r"train on 1, 2 process\(es\).*data.global_batch=4.*optim.lr x 2"):
        _plan(2, 4)
    # data.batch_size bounds what one process takes at once: the accumulation follows.
    bounded = _plan(8, 2, batch_size=2)
    assert (bounded.micro_batch, bounded.accumulation, bounded.global_batch) == (2, 2, 8)
    assert _plan(6, 1, batch_size=4).micro_batch == 3  # the largest split of 6 that fits in 4
    accumulated = _plan(8, 1, grad_accum=2)
    assert (accumulated.micro_batch, accumulated.accumulation) == (4, 2)
    with pytest.raises(ConfigError, match="give one of them"):
        _plan(8, 1, batch_size=2, grad_accum=2)
    with pytest.raises(ConfigError, match="optim.grad_accum 3: each of 1 process"):
        _plan(8, 1, grad_accum=3)
    # Without data.global_batch (older configs) the global batch follows the processes.
    legacy = _plan(None, 4, batch_size=2)
    assert (legacy.global_batch, legacy.stated) == (8, False)


def test_train_dry_run_prints_the_split_for_a_world_size(capsys):
    assert main(["train", str(PAPER_CELL), "--dry-run", "--world-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "model: DAM-Former RGB+NIR+E+T (mit_b4)" in printed
    assert "DTF into encoder level(s) [-1], zero-init False" in printed
    assert (
        "batch on 2 process(es): global batch 2 source + 2 target per optimiser step (data.global_batch) = "
        "1 per process x 2 process(es) x 1 accumulation step(s)" in printed
    )
    # four processes: refused before anything is built, exit 2, one line with the ways out
    result = subprocess.run(
        [sys.executable, "-m", "damformer", "train", str(PAPER_CELL), "--dry-run", "--world-size", "4"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert (
        "cannot be split over 4 processes" in result.stderr and "train on 1, 2 process(es)" in result.stderr
    )


def test_the_paper_study_resolves_to_the_papers_cells(capsys):
    """configs/studies/paper.yaml: 48 trainings; DAM-Former cells fuse into the deepest level only, with the
    authors' initialisation and learning rates, at 2 + 2 per optimiser step; every cell states 2."""
    assert main(["study", str(ROOT / "configs" / "studies" / "paper.yaml"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summaries = [line for line in lines if line.startswith("# ")]
    commands = [line for line in lines if line.startswith("damformer train ")]
    assert len(summaries) == 16 and len(commands) == 48
    assert all("global batch 2 + 2," in line for line in summaries), summaries
    damformer = [line for line in summaries if line.startswith("# damformer-")]
    temporal = [line for line in damformer if "+T" in line]
    assert len(damformer) == 4 and len(temporal) == 2
    assert all("DTF levels [-1] (zero-init false)" in line for line in temporal), temporal
    config = load_config(PAPER_CELL, check_files=False)
    assert config.optim.temporal_lr_mult == 1 and config.optim.head_lr_scope == "classifier"
    assert config.model.aerial_norm == "released" and config.model.mit_size == "mit_b4"
    plus = load_config(ROOT / "configs" / "variants" / "damformer-plus-rgbne-t.yaml", check_files=False)
    assert plus.model.fusion_levels == [-4, -3, -2, -1] and plus.data.global_batch == 2


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["uda.lr_weight=0"], "uda.lr_weight 0 with uda.ensemble_lr_weight 0.2: without the mixed loss"),
        (
            ["uda.lr_weight=0", "uda.ensemble_lr_weight=0", "model.fusion_levels=[]"],
            "model.temporal with model.fusion_levels .. and uda.lr_weight 0: the Sentinel-2 branch",
        ),
        (["uda.feature_distance=true"], "uda.feature_distance: the distance is to ImageNet weights"),
        (["uda.feature_distance=true", "model.arch=unet_c"], "a CNN encoder without them"),
        (["eval.teacher=true", "uda.enabled=false"], "eval.teacher: a source-only run .* has no EMA teacher"),
    ],
)
def test_ablation_rows_that_would_measure_something_else_are_refused(tiny_overrides, tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*tiny_overrides(tmp_path), *sets])


def test_the_rows_without_ml_and_ep_or_without_ep_are_accepted(tiny_overrides, tmp_path):
    load_config(None, [*tiny_overrides(tmp_path), "uda.lr_weight=0", "uda.ensemble_lr_weight=0"])
    load_config(None, [*tiny_overrides(tmp_path), "uda.ensemble_lr_weight=0"])
    load_config(None, [*tiny_overrides(tmp_path), "uda.lr_weight=0", "model.temporal=false"])


@pytest.fixture(scope="module")
def odd_sets(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """North shard sets that differ from the tiny source in one way each."""
    root = tiny_shards["south"].parents[1] / "flair2"
    base = tmp_path_factory.mktemp("odd-shards")
    small = base / "flair2-32px"
    generate(small, _options(patch_size=32))
    sets = {
        "north-sat20": Flair2Dataset(
            root, domains=["north"], with_labels=False, sentinel=SentinelOptions(crop_size=20)
        ),
        "north-single-dates": Flair2Dataset(
            root, domains=["north"], with_labels=False, sentinel=SentinelOptions(monthly_average=False)
        ),
        "north-test-32px": Flair2Dataset(small, domains=["north"], split="test"),
    }
    out = {}
    for name, dataset in sets.items():
        out[name] = base / name
        write_shards(dataset, out[name], ShardWriteOptions(max_samples=4))
    return out


def _options(**changes):
    return replace(TRAIN_OPTIONS, **changes)


@pytest.mark.parametrize(
    ("role", "odd", "message"),
    [
        # another --sat-size: the LR branch would read another crop (and the footprint no longer fits)
        (
            "target",
            "north-sat20",
            r"data.target: .*north-sat20 holds Sentinel-2 crops of 20 px .* 40 px: .* --sat-size 40",
        ),
        ("target", "north-single-dates", r"data.target: .*north-single-dates holds Sentinel-2 single dates"),
        (
            "target_test",
            "north-test-32px",
            r"data.target_test: .*north-test-32px holds aerial patches of 32 px",
        ),
        (
            "target_val",
            "north-test-32px",
            r"data.target_val: .*north-test-32px holds aerial patches of 32 px",
        ),
    ],
)
def test_every_shard_set_is_checked_against_the_model_and_the_source(
    tiny_overrides, odd_sets, tmp_path, role, odd, message
):
    config = load_config(
        None, [*tiny_overrides(tmp_path), f"data.{role}={[str(odd_sets[odd])]}".replace("'", '"')]
    )
    with pytest.raises(ConfigError, match=message):
        Trainer(config)


def test_another_sat_size_with_a_matching_footprint_is_named_against_the_source(
    tiny_overrides, odd_sets, tmp_path
):
    """The target's crop differs from the source's: even a footprint that fits the target is refused."""
    sets = [f'data.target=["{odd_sets["north-sat20"]}"]', "model.footprint=0.064"]
    with pytest.raises(
        ConfigError, match=r"model.footprint: 0.064, but data.source .* cover 0.032 of their 40"
    ):
        Trainer(load_config(None, [*tiny_overrides(tmp_path), *sets]))


def test_a_stated_global_batch_resumes_with_another_split(tiny_overrides, tmp_path):
    """data.batch_size is a memory knob under data.global_batch: it may change on resume; the global batch
    (and so the recipe) stays the checkpoint's."""
    sets = {"optim": {"max_iters": 3}, "eval": {"interval": 0}, "uda": {"mic": False}}
    first = load_config(None, [*tiny_overrides(tmp_path, **sets), "data.global_batch=4", "data.batch_size=2"])
    trainer = Trainer(first)
    assert (trainer.batch.micro_batch, trainer.batch.accumulation) == (2, 2)
    trainer.run(stop_after=1)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_batch"] == 4
    assert "batch_size: 2" in (tmp_path / "config.yaml").read_text()  # the config as stated
    again = Trainer(load_config(None, [*tiny_overrides(tmp_path, **sets), "data.global_batch=4"]))
    result = again.run(resume=True)
    assert result.iterations == 3 and (again.batch.micro_batch, again.batch.accumulation) == (4, 1)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_batch"] == 4
    changed = load_config(None, [*tiny_overrides(tmp_path, **sets), "data.global_batch=2"])
    with pytest.raises(ConfigError, match=re.escape("data.global_batch: 4 in the checkpoint, 2 now")):
        Trainer(changed).run(resume=True)
