"""A tiny sharded south -> north setup for training tests (64 px patches, made by the project itself)."""

from pathlib import Path

import pytest

from damformer.data import Flair2Dataset
from damformer.data.shards import ShardWriteOptions, write_shards
from damformer.data.synth import SynthOptions, generate

TRAIN_OPTIONS = SynthOptions(
    seed=5,
    patch_size=64,
    domains_per_region=1,
    zones_per_domain=1,
    test_zones_per_domain=1,
    patches_per_zone=4,
    min_dates=6,
    max_dates=9,
)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'south', 'north', 'north-test'}: shard sets of the tiny dataset (read-only)."""
    base = tmp_path_factory.mktemp("train-data")
    root = base / "flair2"
    generate(root, TRAIN_OPTIONS)
    sets = {
        "south": Flair2Dataset(root, domains=["south"]),
        "north": Flair2Dataset(root, domains=["north"], with_labels=False),
        "north-test": Flair2Dataset(root, domains=["north"], split="test"),
        "south-no-s2": Flair2Dataset(root, domains=["south"], with_s2=False),
    }
    out = {}
    for name, dataset in sets.items():
        out[name] = base / "shards" / name
        write_shards(dataset, out[name], ShardWriteOptions(max_samples=2))
    return out


@pytest.fixture
def tiny_overrides(tiny_shards):
    """A function (output, **sections) -> --set overrides of a tiny, fast DAM-Former UDA run."""
    return lambda output, **sections: _overrides(tiny_shards, output, **sections)


def _overrides(shards: dict[str, Path], output: Path, **sections) -> list[str]:
    values = {
        "data.source": [str(shards["south"])],
        "data.target": [str(shards["north"])],
        "data.target_test": [str(shards["north-test"])],
        "model.backbone": "mit_b0",
        "model.arch": "damformer",
        "model.band_init": "inflate",
        "model.footprint": 0.032,  # 64 px x 0.2 m aerial patches in 40 x 10 m Sentinel-2 crops
        "uda.pseudo_threshold": 0.5,
        "uda.mic": True,
        "optim.lr": 0.0006,
        "optim.warmup": 2,
        "optim.max_iters": 6,
        "eval.interval": 3,
        "log.interval": 1,
        "log.checkpoint_interval": 2,
        "log.tracking": False,  # tests/tracking/ turn it on (an MLflow sqlite store costs ~3 s per run)
        "run.output_dir": str(output),
        "run.device": "cpu",
    }
    for section, entries in sections.items():
        for key, value in entries.items():
            values[f"{section}.{key}"] = value
    return [f"{k}={_yaml(v)}" for k, v in values.items()]


def _yaml(value) -> str:
    import json

    return json.dumps(value)  # JSON is YAML
