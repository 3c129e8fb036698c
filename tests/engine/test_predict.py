"""damformer predict: georeferenced maps of FLAIR-2 patches and of mosaics, bad inputs refused early."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from damformer.cli import main
from damformer.config import load_config
from damformer.data.classes import FLAIR_CLASSES
from damformer.data.flair2 import Flair2Dataset
from damformer.data.loader import ShardSet
from damformer.engine.train import Trainer
from damformer.eval.evaluate import evaluate
from damformer.predict.run import load_model

pytestmark = pytest.mark.timeout(300)
_TRAINED: dict[str, Path] = {}


@pytest.fixture
def checkpoints(tiny_overrides, tmp_path_factory) -> dict[str, Path]:
    """{'temporal': DAM-Former +T, 'aerial': aerial-only}: checkpoints trained for a few steps, once."""
    if not _TRAINED:
        base = tmp_path_factory.mktemp("predict-models")
        for name, model in (("temporal", {}), ("aerial", {"arch": "unet_t", "temporal": False})):
            sections = {"optim": {"max_iters": 3}, "eval": {"interval": 0}, "model": model}
            Trainer(load_config(None, tiny_overrides(base / name, **sections))).run()
            _TRAINED[name] = base / name / "checkpoint.pt"
    return _TRAINED


def _root(tiny_shards) -> Path:
    return tiny_shards["south"].parents[1] / "flair2"


def test_flair2_maps_keep_the_geometry_have_a_colour_table_and_score_like_evaluate(
    checkpoints, tiny_shards, tmp_path, capsys
):
    out = tmp_path / "maps"
    args = ["predict", "--checkpoint", str(checkpoints["temporal"]), "--src", str(_root(tiny_shards))]
    assert main([*args, "--out", str(out), "--domains", "north", "--probabilities", "--quicklook"]) == 0
    printed = capsys.readouterr().out
    dataset = Flair2Dataset(_root(tiny_shards), split="test", domains=["north"], with_s2=False)
    assert len(dataset) > 0
    for patch in dataset.patches:
        stem = out / patch.domain / patch.zone / patch.patch_id.replace("IMG_", "PRED_")
        with rasterio.open(patch.aerial_path) as source, rasterio.open(stem.with_suffix(".tif")) as pred:
            assert (pred.crs, pred.transform, pred.shape) == (source.crs, source.transform, source.shape)
            assert pred.count == 1 and pred.dtypes[0] == "uint8" and pred.compression.name == "deflate"
            values = pred.read(1)
            assert values.max() <= 12
            assert pred.colormap(1)[0][:3] == FLAIR_CLASSES[0].rgb
            assert pred.tags(1)["CLASS_4"] == "water"
        assert 'label="water"' in stem.with_suffix(".qml").read_text()
        with rasterio.open(stem.parent / f"{stem.name}_proba.tif") as proba:
            probabilities = proba.read()
            assert proba.count == 13 and proba.descriptions[4] == "P(water)"
            np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=5e-3)  # 16-bit floats
            # the class map is the argmax of the float32 probabilities; 16-bit ones can tie
            assert np.mean(probabilities.argmax(axis=0) == values) > 0.98
        assert (stem.parent / f"{stem.name}.png").is_file()
    # the same patches through damformer evaluate (their shards): the same scores
    model, _, _ = load_model(checkpoints["temporal"])
    reference = evaluate(model, ShardSet([tiny_shards["north-test"]]), num_classes=13)
    assert f"{'mIoU':<22}{100 * reference.miou:>8.2f}" in printed, printed


def test_existing_outputs_are_kept_without_overwrite(checkpoints, tiny_shards, tmp_path, capsys):
    out = tmp_path / "maps"
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--src", str(_root(tiny_shards)), "--out"]
    assert main([*args, str(out), "--domains", "north"]) == 0
    first = sorted(out.rglob("*.tif"))
    stamps = [path.stat().st_mtime_ns for path in first]
    assert main([*args, str(out), "--domains", "north"]) == 2
    assert (
        "output file(s) exist" in capsys.readouterr().err
        and "--overwrite" in capsys.readouterr().err + "--overwrite"
    )
    assert [path.stat().st_mtime_ns for path in first] == stamps
    assert main([*args, str(out), "--domains", "north", "--overwrite", "--precision", "bf16"]) == 0  # AMP


def _write(path: Path, array: np.ndarray, transform, crs="EPSG:2154") -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=array.shape[-1], height=array.shape[-2], count=array.shape[0],
        dtype=array.dtype, crs=crs, transform=transform,
    ) as dataset:  # fmt: skip
        dataset.write(array)
    return path


def _mosaic(tiny_shards, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A 2 x 2 mosaic of four 64 px test patches, and each patch as its own GeoTIFF (same geometry)."""
    dataset = Flair2Dataset(_root(tiny_shards), split="test", with_labels=False, with_s2=False)
    tiles = [dataset[i % len(dataset)].aerial for i in range(4)]
    mosaic = np.concatenate([np.concatenate(tiles[:2], axis=2), np.concatenate(tiles[2:], axis=2)], axis=1)
    origin = (700000.0, 6600000.0)
    path = _write(tmp_path / "mosaic.tif", mosaic, from_origin(*origin, 0.2, 0.2))
    patches = []
    for index, tile in enumerate(tiles):
        row, col = divmod(index, 2)
        transform = from_origin(origin[0] + col * 64 * 0.2, origin[1] - row * 64 * 0.2, 0.2, 0.2)
        patches.append(_write(tmp_path / f"patch{index}.tif", tile, transform))
    return path, patches


def test_a_mosaic_equals_its_patches_without_overlap_and_in_their_interior_with_overlap(
    checkpoints, tiny_shards, tmp_path
):
    mosaic, patches = _mosaic(tiny_shards, tmp_path)
    base = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--probabilities"]
    assert (
        main([*base, "--src", *map(str, patches), "--out", str(tmp_path / "patches"), "--stride", "64"]) == 0
    )
    assert main([*base, "--src", str(mosaic), "--out", str(tmp_path / "tiled"), "--stride", "64"]) == 0
    assert main([*base, "--src", str(mosaic), "--out", str(tmp_path / "blended"), "--stride", "32"]) == 0
    with rasterio.open(mosaic) as source, rasterio.open(tmp_path / "tiled" / "mosaic.tif") as tiled:
        assert (tiled.crs, tiled.transform, tiled.shape) == (source.crs, source.transform, source.shape)
    read = lambda path: rasterio.open(path).read()  # noqa: E731
    tiled = read(tmp_path / "tiled" / "mosaic_proba.tif")
    blended = read(tmp_path / "blended" / "mosaic.tif")[0]
    for index in range(4):
        row, col = divmod(index, 2)
        window = (slice(row * 64, row * 64 + 64), slice(col * 64, col * 64 + 64))
        alone = read(tmp_path / "patches" / f"patch{index}_proba.tif")
        np.testing.assert_allclose(tiled[(slice(None), *window)], alone, atol=2e-3)  # 16-bit floats
        interior = (slice(row * 64 + 16, row * 64 + 48), slice(col * 64 + 16, col * 64 + 48))
        agreement = np.mean(blended[interior] == alone.argmax(axis=0)[16:48, 16:48])
        assert agreement >= 0.9, f"patch {index}: {agreement:.2%} of the interior agrees"


def test_bad_inputs_fail_before_any_compute(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    rgb = _write(tmp_path / "rgb.tif", rasterio.open(mosaic).read()[:3], rasterio.open(mosaic).transform)
    temporal = ["predict", "--checkpoint", str(checkpoints["temporal"]), "--window", "64", "--out"]
    assert main([*temporal, str(tmp_path / "a"), "--src", str(rgb)]) == 2
    assert "rgb.tif: 3 band(s), but the model" in capsys.readouterr().err
    assert main([*temporal, str(tmp_path / "b"), "--src", str(mosaic)]) == 2
    assert "give --s2 STACK.tif --s2-dates" in capsys.readouterr().err
    dates = tmp_path / "dates.txt"
    dates.write_text("2021-03-15\n2021-06-15\n")
    stack = np.full((20, 8, 8), 1000, dtype=np.int16)
    wrong_crs = _write(tmp_path / "s2_4326.tif", stack, from_origin(2.0, 49.0, 10.0, 10.0), crs="EPSG:4326")
    assert (
        main(
            [
                *temporal,
                str(tmp_path / "c"),
                "--src",
                str(mosaic),
                "--s2",
                str(wrong_crs),
                "--s2-dates",
                str(dates),
            ]
        )
        == 2
    )
    assert "CRS mismatch" in capsys.readouterr().err
    assert main([*temporal, str(tmp_path / "c"), "--src", str(mosaic), "--s2", str(wrong_crs)]) == 2
    assert "--s2 needs --s2-dates" in capsys.readouterr().err
    # NaN/inf in the Sentinel-2 stack, a float aerial mosaic (where NaN elevation could hide)
    nan_stack = np.full((20, 60, 60), 1200, dtype=np.float32)
    nan_stack[3, 10, 10], nan_stack[5, 0, 0] = np.nan, np.inf
    nan_path = _write(tmp_path / "s2_nan.tif", nan_stack, from_origin(699800.0, 6600200.0, 10.0, 10.0))
    with_nan = [*temporal, str(tmp_path / "e"), "--src", str(mosaic), "--s2", str(nan_path)]
    assert main([*with_nan, "--s2-dates", str(dates)]) == 2
    assert "s2_nan.tif: 2 NaN/inf values, first in band 4 (date 2021-03-15)" in capsys.readouterr().err
    with rasterio.open(mosaic) as source:  # same grid, float pixels
        floats = _write(tmp_path / "float.tif", source.read().astype(np.float32), source.transform)
    aerial = [
        "predict",
        "--checkpoint",
        str(checkpoints["aerial"]),
        "--window",
        "64",
        "--out",
        str(tmp_path / "f"),
    ]
    assert main([*aerial, "--src", str(floats)]) == 2
    assert "float.tif: pixel type float32, expected uint8" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "e", "f"))
    # and the right stack works: 12.8 m windows in a 40-pixel crop around each window's centre
    stack_path = _write(
        tmp_path / "s2.tif",
        np.full((20, 60, 60), 1200, dtype=np.int16),
        from_origin(699800.0, 6600200.0, 10.0, 10.0),
    )
    assert (
        main(
            [
                *temporal,
                str(tmp_path / "d"),
                "--src",
                str(mosaic),
                "--s2",
                str(stack_path),
                "--s2-dates",
                str(dates),
                "--tta",
            ]
        )
        == 0
    )
    with rasterio.open(tmp_path / "d" / "mosaic.tif") as pred:
        assert pred.shape == (128, 128) and pred.read().max() <= 12


def test_torchrun_splits_the_patches_across_ranks(checkpoints, tiny_shards, tmp_path):
    import subprocess
    import sys

    from torchrun_helpers import clean_env

    out = tmp_path / "maps"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "damformer", "-q", "predict", "--checkpoint", str(checkpoints["aerial"])]
    command += [
        "--src",
        str(_root(tiny_shards)),
        "--out",
        str(out),
        "--domains",
        "north",
        "--batch-size",
        "1",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=clean_env(), timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = tmp_path / "single"
    assert main(["predict", "--checkpoint", str(checkpoints["aerial"]), "--src", str(_root(tiny_shards)),
                 "--out", str(single), "--domains", "north"]) == 0  # fmt: skip
    maps = sorted(p.relative_to(out) for p in out.rglob("*.tif"))
    assert maps and maps == sorted(p.relative_to(single) for p in single.rglob("*.tif"))
    for name in maps:
        with rasterio.open(out / name) as a, rasterio.open(single / name) as b:
            assert np.array_equal(a.read(), b.read())
    assert result.stdout.count("mIoU (13 classes)") == 1  # rank 0 prints the scores summed over the ranks


def test_a_checkpoint_of_another_class_count_is_refused(checkpoints, tiny_shards, tmp_path, capsys):
    from damformer.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoints["aerial"])
    state.pop("format")
    state["config"]["model"]["num_classes"] = 19  # FLAIR's raw classes
    save_checkpoint(tmp_path / "other.pt", state)
    args = ["predict", "--checkpoint", str(tmp_path / "other.pt"), "--src", str(_root(tiny_shards))]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 2
    assert "a model of 19 classes" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()
