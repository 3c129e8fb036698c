"""damformer predict: georeferenced maps of FLAIR-2 patches and of mosaics, bad inputs refused early."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.windows
import torch
from rasterio.transform import from_origin

from damformer.cli import main
from damformer.config import load_config
from damformer.data.classes import FLAIR_CLASSES
from damformer.data.flair2 import Flair2Dataset
from damformer.engine.train import Trainer
from damformer.eval.evaluate import evaluate
from damformer.runtime.model_files import load_model
from damformer.shards.shardset import ShardSet

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
            # the class map is the argmax of the float32 probabilities. Rounding to 16 bits keeps their
            # order but can make two equal, so on every pixel the map's class holds the stored maximum
            mapped = np.take_along_axis(probabilities, values[None].astype(np.int64), axis=0)[0]
            assert np.array_equal(mapped, probabilities.max(axis=0))
        assert (stem.parent / f"{stem.name}.png").is_file()
    # the same patches through damformer evaluate (their shards): the same scores
    model = load_model(checkpoints["temporal"])
    reference = evaluate(model, ShardSet([tiny_shards["north-test"]]), num_classes=13)
    assert f"{'mIoU (13 classes)':<22}{100 * reference.miou:>8.2f}" in printed, printed
    assert f"{'mIoU (12, no other)':<22}{100 * reference.miou_without_other:>8.2f}" in printed, printed


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
    assert "rgb.tif: 3 band(s); the model (DAM-Former RGB+NIR+E+T) reads 5" in capsys.readouterr().err
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


def test_predict_writes_maps_without_gdal_noise_on_stderr(checkpoints, tiny_shards, tmp_path):
    import re
    import subprocess
    import sys

    from tests.helpers.torchrun import clean_env

    command = [sys.executable, "-m", "damformer", "predict", "--checkpoint", str(checkpoints["temporal"])]
    command += ["--src", str(_root(tiny_shards)), "--out", str(tmp_path / "maps"), "--domains", "north"]
    result = subprocess.run(
        [*command, "--probabilities", "--quicklook"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "maps").rglob("PRED_*.tif"))
    noise = re.compile(r"GDAL|CPLE_|PhotometricInterpretation|^(ERROR|Warning) \d+:|rasterio")
    assert not [line for line in result.stderr.splitlines() if noise.search(line)], result.stderr


def test_torchrun_splits_the_patches_across_ranks(checkpoints, tiny_shards, tmp_path):
    import subprocess
    import sys

    from tests.helpers.torchrun import clean_env

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
    from damformer.runtime.artifacts import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoints["aerial"])
    state.pop("format")
    state["config"]["model"]["num_classes"] = 19  # FLAIR's raw classes
    save_checkpoint(tmp_path / "other.pt", state)
    args = ["predict", "--checkpoint", str(tmp_path / "other.pt"), "--src", str(_root(tiny_shards))]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 2
    assert "a model of 19 classes" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


# -- issue 21: nothing silently wrong on real rasters -----------------------------------------------


def _naive_blend(aerial, predict, *, num_classes, window, stride):
    """Today's in-memory blend, kept here as the oracle of the streamed one (no padding: big rasters)."""
    from damformer.predict.streaming import blend_weights, window_axis

    _, height, width = aerial.shape
    weights = blend_weights(window) if stride < window else np.ones((window, window), np.float32)
    total = np.zeros((num_classes, height, width), np.float32)
    weight_sum = np.zeros((height, width), np.float32)
    for row in window_axis(height, window, stride):
        for col in window_axis(width, window, stride):
            batch = {
                "aerial": torch.from_numpy(aerial[None, :, row : row + window, col : col + window].copy())
            }
            total[:, row : row + window, col : col + window] += predict(batch).numpy()[0] * weights
            weight_sum[row : row + window, col : col + window] += weights
    return total / weight_sum


def _toy_predictor(batch):
    """Probabilities that depend on every pixel of the window (a fixed random 1x1 conv + spatial mean)."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 5, generator=generator)
    x = batch["aerial"].float() / 255
    logits = torch.einsum("kc,bchw->bkhw", conv, x) + x.mean(dim=(1, 2, 3))[:, None, None, None]
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize(("window", "stride"), [(32, 32), (32, 24), (32, 13)])
def test_streamed_blend_equals_the_in_memory_blend_exactly(window, stride):
    from damformer.predict.streaming import SweepOptions, sweep

    aerial = np.random.default_rng(0).integers(0, 256, (5, 150, 211), dtype=np.uint8)
    expected = _naive_blend(aerial, _toy_predictor, num_classes=4, window=window, stride=stride)
    out = np.full_like(expected, np.nan)
    options = SweepOptions(window, stride, batch_size=3, band_width=48, row_block=16)  # many bands and blocks
    read = lambda r, c, h, w: aerial[:, r : r + h, c : c + w]  # noqa: E731
    for block in sweep(read, 150, 211, _toy_predictor, num_classes=4, options=options):
        rows, cols = block.probabilities.shape[1:]
        assert rows <= 16 and cols <= 48
        out[:, block.row : block.row + rows, block.col : block.col + cols] = block.probabilities
    np.testing.assert_array_equal(out, expected)


def test_nodata_in_nodata_out(checkpoints, tiny_shards, tmp_path):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    with rasterio.open(mosaic) as source:
        array, transform = source.read(), source.transform
    array[:, :, :40] = 0  # a gap of the mosaic, all bands 0 = nodata
    array[:, 100:, 100:] = 0
    rest = array[:, :100, 40:]
    rest[:, rest.sum(axis=0) == 0] = 1  # no accidental nodata elsewhere (all-zero pixels)
    gapped = tmp_path / "gapped.tif"
    with rasterio.open(gapped, "w", driver="GTiff", width=128, height=128, count=5, dtype="uint8",
                       crs="EPSG:2154", transform=transform, nodata=0) as dataset:  # fmt: skip
        dataset.write(array)
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(gapped)]
    assert main([*args, "--out", str(tmp_path / "maps"), "--probabilities"]) == 0
    with rasterio.open(tmp_path / "maps" / "gapped.tif") as classes_map:
        assert classes_map.nodata == 255
        values = classes_map.read(1)
    gap = np.zeros((128, 128), bool)
    gap[:, :40] = True
    gap[100:, 100:] = True
    assert (values[gap] == 255).all() and (values[~gap] <= 12).all()
    with rasterio.open(tmp_path / "maps" / "gapped_proba.tif") as probabilities:
        p = probabilities.read()
        assert np.isnan(probabilities.nodata) and np.isnan(p[:, gap]).all() and np.isfinite(p[:, ~gap]).all()


def test_a_raster_of_another_band_count_needs_bands(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    with rasterio.open(mosaic) as source:
        six = _write(
            tmp_path / "six.tif", np.concatenate([source.read(), source.read(1)[None]]), source.transform
        )
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(six)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "six.tif: 6 band(s); the model (U-Net (T) RGB+NIR+E) reads 5" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--bands", "1,2,3,4,7"]) == 2
    assert "--bands 1,2,3,4,7: expected 5 band numbers" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--bands", "1,2,3,4,5"]) == 0
    assert main([*args[:-2], "--src", str(mosaic), "--out", str(tmp_path / "d")]) == 0
    same = [rasterio.open(tmp_path / d / f"{n}.tif").read() for d, n in (("c", "six"), ("d", "mosaic"))]
    np.testing.assert_array_equal(*same)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _stack(path: Path, shape: tuple[int, int], origin: tuple[float, float], months: int = 2) -> Path:
    return _write(
        path, np.full((10 * months, *shape), 1200, dtype=np.int16), from_origin(*origin, 10.0, 10.0)
    )


def test_a_stack_that_does_not_cover_the_raster_is_refused(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)  # x 700000..700025.6, y 6599974.4..6600000
    dates = tmp_path / "dates.txt"
    dates.write_text("2021-03-15\n2021-06-15\n")
    args = ["predict", "--checkpoint", str(checkpoints["temporal"]), "--window", "64", "--src", str(mosaic)]
    far = _stack(tmp_path / "far.tif", (60, 60), (750000.0, 6600200.0))  # 50 km east
    assert main([*args, "--out", str(tmp_path / "a"), "--s2", str(far), "--s2-dates", str(dates)]) == 2
    err = capsys.readouterr().err
    # window centres 6.4 and 19.2 m into the raster, crops of 400 m (less half a pixel: 195 m each side)
    assert "does not cover the aerial raster" in err and "needs x 699811..700214, y 6599786..6600189" in err
    assert "covers x 750000..750600" in err
    partial = _stack(tmp_path / "partial.tif", (60, 60), (699900.0, 6600200.0))  # misses 89 m in the west
    command = [*args, "--out", str(tmp_path / "b"), "--s2", str(partial), "--s2-dates", str(dates)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "covers the aerial raster only in part" in err and "--allow-partial-s2" in err
    assert main([*command, "--allow-partial-s2"]) == 0
    assert not (tmp_path / "a").exists()


def test_mosaic_and_folder_predict_agree_exactly_on_the_same_monthly_means(
    checkpoints, tiny_shards, tmp_path
):
    """Each test patch as a GeoTIFF with its own monthly-mean stack, against folder predict: same maps."""
    from damformer.data.sentinel import SentinelOptions

    folder = ["predict", "--checkpoint", str(checkpoints["temporal"]), "--src", str(_root(tiny_shards))]
    assert main([*folder, "--domains", "north", "--out", str(tmp_path / "folder"), "--batch-size", "1",
                 "--probabilities"]) == 0  # fmt: skip
    dataset = Flair2Dataset(
        _root(tiny_shards), split="test", domains=["north"], sentinel=SentinelOptions(crop_size=40)
    )
    for index in range(len(dataset)):
        sample, patch = dataset[index], dataset.patches[index]
        centre_x, centre_y = sample.transform @ (32, 32)
        stack = _write(tmp_path / f"s2_{index}.tif", sample.s2.reshape(-1, 40, 40).astype(np.float32),
                       from_origin(centre_x - 200, centre_y + 200, 10.0, 10.0))  # fmt: skip
        dates = tmp_path / f"dates_{index}.txt"
        dates.write_text("".join(f"{d.isoformat()}\n" for d in sample.s2_dates))
        out = tmp_path / f"mosaic_{index}"
        assert main(["predict", "--checkpoint", str(checkpoints["temporal"]), "--src", str(patch.aerial_path),
                     "--s2", str(stack), "--s2-dates", str(dates), "--window", "64", "--stride", "64",
                     "--out", str(out), "--probabilities"]) == 0  # fmt: skip
        name = patch.patch_id.replace("IMG_", "PRED_", 1)
        for suffix in (".tif", "_proba.tif"):
            with (
                rasterio.open(out / f"{patch.patch_id}{suffix}") as mine,
                rasterio.open(tmp_path / "folder" / patch.domain / patch.zone / f"{name}{suffix}") as theirs,
            ):
                np.testing.assert_array_equal(mine.read(), theirs.read(), err_msg=f"{patch.patch_id}{suffix}")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: expected >= 1"),
        (["--window", "100"], "--window 100: expected a multiple of 32"),
        (["--window", "0"], "--window 0: expected a multiple of 32"),
        (["--stride", "80"], "--stride 80: expected 1..--window (64)"),
    ],
)
def test_bad_predict_options_are_one_line(extra, message, checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(mosaic)]
    assert main([*args, "--out", str(tmp_path / "maps"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "maps").exists()


def test_an_output_folder_that_is_a_file_or_read_only_is_refused(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(mosaic)]
    (tmp_path / "a-file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file: is a file, expected a folder" in capsys.readouterr().err
    assert main([*args, "--out", "/proc/damformer-maps"]) == 2  # read-only, even for root
    assert "--out /proc/damformer-maps: cannot write in /proc" in capsys.readouterr().err


def test_a_truncated_geotiff_is_one_line_and_writes_nothing(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    data = mosaic.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(truncated)]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 2
    err = capsys.readouterr().err
    assert "truncated.tif" in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "maps").rglob("*.tif")) if (tmp_path / "maps").exists() else True


# -- issue 29: nothing silently wrong, every bad input one line ---------------------------------------


def _dates(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _constant_stack(path: Path, value: float, dates: int = 2) -> Path:
    values = np.full((10 * dates, 60, 60), value, dtype=np.float32)
    return _write(path, values, from_origin(699800.0, 6600200.0, 10.0, 10.0))


def test_predict_refuses_inputs_that_would_map_wrongly(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, patches = _mosaic(tiny_shards, tmp_path)
    aerial = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64"]
    # two inputs of one name would write one map
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    twins = [patches[0].rename(tmp_path / "a" / "tile.tif"), patches[1].rename(tmp_path / "b" / "tile.tif")]
    assert main([*aerial, "--src", *map(str, twins), "--out", str(tmp_path / "twins")]) == 2
    assert "would both be written to" in capsys.readouterr().err
    # a stride of 0 is not "the default", and a window larger than the raster needs is refused
    assert main([*aerial, "--src", str(mosaic), "--out", str(tmp_path / "s"), "--stride", "0"]) == 2
    assert "--stride 0: expected 1..--window (64)" in capsys.readouterr().err
    wide = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "65536", "--src", str(mosaic)]
    assert main([*wide, "--out", str(tmp_path / "w")]) == 2
    assert "--window 65536: larger than" in capsys.readouterr().err
    # Sentinel-2: dates that do not increase, and reflectance in 0..1 instead of x 10000
    temporal = [
        "predict",
        "--checkpoint",
        str(checkpoints["temporal"]),
        "--window",
        "64",
        "--src",
        str(mosaic),
    ]
    good = _constant_stack(tmp_path / "s2.tif", 1200)
    for lines in (("2021-06-15", "2021-03-15"), ("2021-03-15", "2021-03-15")):
        dates = _dates(tmp_path / "dates.txt", *lines)
        assert (
            main([*temporal, "--out", str(tmp_path / "d"), "--s2", str(good), "--s2-dates", str(dates)]) == 2
        )
        assert f"line 2: {lines[1]} is not after {lines[0]}" in capsys.readouterr().err
    dates = _dates(tmp_path / "dates.txt", "2021-03-15", "2021-06-15")
    unit = _constant_stack(tmp_path / "s2_unit.tif", 0.12)
    assert main([*temporal, "--out", str(tmp_path / "u"), "--s2", str(unit), "--s2-dates", str(dates)]) == 2
    assert "the model reads L2A reflectance x 10000" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("twins", "s", "w", "d", "u"))


def test_every_file_predict_writes_obeys_overwrite(checkpoints, tiny_shards, tmp_path, capsys):
    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--src", str(mosaic)]
    out = tmp_path / "maps"
    assert main([*args, "--out", str(out)]) == 0
    style = out / "mosaic.qml"
    style.write_text("my own QGIS style")  # a user's edit of the sidecar
    (out / "mosaic.tif").unlink()
    assert main([*args, "--out", str(out)]) == 2
    assert "mosaic.qml" in capsys.readouterr().err
    assert style.read_text() == "my own QGIS style"


def test_an_alpha_band_masks_the_map_whatever_bands_are_chosen(checkpoints, tiny_shards, tmp_path):
    from rasterio.enums import ColorInterp

    mosaic, _ = _mosaic(tiny_shards, tmp_path)
    with rasterio.open(mosaic) as source:
        bands, transform = source.read(), source.transform
    alpha = np.full((1, *bands.shape[1:]), 255, dtype=np.uint8)
    alpha[0, :, :40] = 0  # the left 40 columns are transparent
    path = _write(tmp_path / "six.tif", np.concatenate([bands, alpha]), transform)
    with rasterio.open(path, "r+") as dataset:  # GDAL keeps a 6th alpha band out of the dataset mask
        dataset.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined,
                               ColorInterp.undefined, ColorInterp.alpha]  # fmt: skip
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--window", "64", "--bands", "1,2,3,4,5"]
    assert main([*args, "--src", str(path), "--out", str(tmp_path / "maps")]) == 0
    with rasterio.open(tmp_path / "maps" / "six.tif") as pred:
        values = pred.read(1)
    assert (values[:, :40] == 255).all() and (values[:, 40:] <= 12).all()  # 255: nodata


def test_stack_dates_start_where_training_puts_them(tmp_path, caplog):
    from damformer.predict.stack import SentinelStack

    dates = _dates(tmp_path / "dates.txt", "2020-12-15", "2021-02-15", "2021-06-15")
    stack = SentinelStack.open(_constant_stack(tmp_path / "s2.tif", 1200, dates=3), dates)
    # May 15 of 2021, the year two of the three dates fall in (not 2020, the first date's year)
    assert list(stack.day_offsets) == [-151, -89, 31]
    assert "Sentinel-2 day offsets from 2021-05-15: May 15 of 2021, the year 2 of the 3 dates fall in" in (
        caplog.text
    )


def test_a_temporal_model_on_patches_too_small_for_its_crop_is_refused(
    checkpoints, tiny_shards, tmp_path, capsys
):
    from damformer.runtime.artifacts import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoints["temporal"])
    state.pop("format")
    state["config"]["model"]["footprint"] = 0.16  # trained on 128 px patches in 16-pixel crops
    save_checkpoint(tmp_path / "wide.pt", state)
    args = ["predict", "--checkpoint", str(tmp_path / "wide.pt"), "--src", str(_root(tiny_shards))]
    assert main([*args, "--out", str(tmp_path / "maps"), "--domains", "north"]) == 2
    err = capsys.readouterr().err
    assert "64 px x 0.2 m patches or windows cover 0.16 of a 8.0-pixel Sentinel-2 crop" in err, err
    assert "needs crops of at least 16 pixels" in err and not (tmp_path / "maps").exists()


def test_maps_carry_overviews_and_a_vrt_mosaic_of_the_folder(checkpoints, tiny_shards, tmp_path):
    out = tmp_path / "maps"
    args = ["predict", "--checkpoint", str(checkpoints["aerial"]), "--src", str(_root(tiny_shards))]
    assert main([*args, "--out", str(out), "--domains", "north"]) == 0
    maps = sorted(p for p in out.rglob("*.tif"))
    assert len(maps) >= 2
    with rasterio.open(out / "maps.vrt") as mosaic:
        assert (
            mosaic.crs is not None and mosaic.count == 1 and mosaic.colormap(1)[4][:3] == FLAIR_CLASSES[4].rgb
        )
        for path in maps:
            with rasterio.open(path) as single:
                assert single.overviews(1) == [
                    2
                ]  # 64 px maps: one level (QGIS zooms out without reading all)
                window = rasterio.windows.from_bounds(*single.bounds, transform=mosaic.transform)
                assert np.array_equal(
                    mosaic.read(1, window=window.round_offsets().round_lengths()), single.read(1)
                )
