"""Every kind of malformed FLAIR-2 copy gives one clear error naming the file, expected and found.

Each case corrupts a private copy of the tiny dataset, then checks (1) the library raises our own
exception type with the file and the expectation in its message, and (2) the CLI prints that as one line
on stderr with exit code 2 and no traceback.
"""

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio

from damformer.cli import main
from damformer.data import Flair2Dataset, SentinelOptions
from damformer.errors import DataFormatError, DataLayoutError, DomainSelectionError, NoClearDateError

SOUTH_ZONE = ("D081_2020", "Z1_NN")
SEN = "flair_sen_train/D081_2020/Z1_NN/sen/SEN2_sp_D081_2020-Z1_NN"
IMG1 = "flair_aerial_train/D081_2020/Z1_NN/img/IMG_000001.tif"
MSK1 = "flair_labels_train/D081_2020/Z1_NN/msk/MSK_000001.tif"


def _rewrite_tiff(path: Path, array: np.ndarray, dtype: str = "uint8") -> None:
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(count=array.shape[0], height=array.shape[1], width=array.shape[2], dtype=dtype)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(dtype))


def _read_tiff(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _set_centroid(root: Path, value: object) -> None:
    _edit_json(root / "flair-2_centroids_sp_to_patch.json", lambda c: c.__setitem__("IMG_000001.tif", value))


def _with_nan(array: np.ndarray, band: int = 0) -> np.ndarray:
    array[..., band, 0, 0] = np.nan  # (bands, H, W) or (T, bands, H, W)
    array[..., band, 0, 1] = np.inf
    return array


def _superpatch_shape(root: Path) -> tuple[int, ...]:
    return np.load(root / f"{SEN}_data.npy", mmap_mode="r").shape


@dataclass
class Case:
    corrupt: Callable[[Path], None]
    error: type
    fragments: tuple[str, ...]  # must all appear in the message
    options: dict | None = None
    cli_args: tuple[str, ...] = ()


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


CASES: dict[str, Case] = {
    "missing aerial folder": Case(
        lambda r: (r / "flair_aerial_train").rename(r / "aerial"),
        DataLayoutError,
        ("no aerial folder for split 'train'", "flair_aerial_train", "--aerial-dir"),
    ),
    "missing labels folder": Case(
        lambda r: (r / "flair_labels_train").rename(r / "labels"),
        DataLayoutError,
        ("no labels folder", "--labels-dir"),
    ),
    "missing Sentinel-2 folder": Case(
        lambda r: (r / "flair_sen_train").rename(r / "sen"), DataLayoutError, ("no sen folder", "--sen-dir")
    ),
    "missing label file": Case(
        lambda r: (r / MSK1).unlink(), DataLayoutError, ("1 label file(s) missing", "MSK_000001.tif")
    ),
    "missing Sentinel-2 masks": Case(
        lambda r: Path(r / f"{SEN}_masks.npy").unlink(),
        DataLayoutError,
        ("SEN2_sp_D081_2020-Z1_NN_masks.npy", "missing for zone D081_2020-Z1_NN", "IMG_000001"),
    ),
    "missing centroid JSON": Case(
        lambda r: (r / "flair-2_centroids_sp_to_patch.json").unlink(),
        DataLayoutError,
        ("centroid JSON not found", "--centroids-json"),
    ),
    "centroid JSON lacks a patch": Case(
        lambda r: _edit_json(r / "flair-2_centroids_sp_to_patch.json", lambda c: c.pop("IMG_000001.tif")),
        DataFormatError,
        ("flair-2_centroids_sp_to_patch.json", "no centroid for IMG_000001.tif"),
    ),
    "centroid outside the superpatch": Case(
        lambda r: _set_centroid(r, [500, 12]),
        DataFormatError,
        ("centroid of IMG_000001.tif", "inside the", "found [500, 12]"),
    ),
    "centroid too close to the edge": Case(
        lambda r: _set_centroid(r, [5, 30]),
        DataFormatError,
        ("centroid of IMG_000001.tif", "40 x 40 crop inside", "too close to the edge", "--sat-size"),
    ),
    "centroid not a pair of integers": Case(
        lambda r: _set_centroid(r, {"x": 1}), DataFormatError, ("expected [row, col] integers",)
    ),
    "aerial with 3 bands": Case(
        lambda r: _rewrite_tiff(r / IMG1, _read_tiff(r / IMG1)[:3]),
        DataFormatError,
        ("IMG_000001.tif", "aerial patch band count", "expected 5, found 3"),
    ),
    "aerial in uint16": Case(
        lambda r: _rewrite_tiff(r / IMG1, _read_tiff(r / IMG1), dtype="uint16"),
        DataFormatError,
        ("IMG_000001.tif", "aerial patch dtype", "expected uint8, found uint16"),
    ),
    "aerial of the wrong size": Case(
        lambda r: None,
        DataFormatError,
        ("img/IMG_00000", "aerial patch size", "expected 512 x 512, found 64 x 64"),
        options={"patch_size": 512},
        cli_args=("--patch-size", "512"),
    ),
    "aerial not square": Case(
        lambda r: _rewrite_tiff(r / IMG1, _read_tiff(r / IMG1)[:, :48]),
        DataFormatError,
        ("IMG_000001.tif", "expected a square, found 48 x 64"),
    ),
    "label size differs from aerial": Case(
        lambda r: _rewrite_tiff(r / MSK1, _read_tiff(r / MSK1)[:, :32, :32]),
        DataFormatError,
        ("MSK_000001.tif", "label size", "expected 64 x 64", "found 32 x 32"),
    ),
    "label values outside 1..19": Case(
        lambda r: _rewrite_tiff(
            r / MSK1,
            np.where(_read_tiff(r / MSK1) == _read_tiff(r / MSK1).flat[0], 0, _read_tiff(r / MSK1))
            | (np.arange(64) == 5)[None, None] * 24,
        ),
        DataFormatError,
        ("MSK_000001.tif", "label values", "expected 1..19", "0"),
    ),
    "truncated GeoTIFF": Case(
        lambda r: _truncate(r / IMG1, 3000),
        DataFormatError,
        ("IMG_000001.tif", "cannot read aerial patch GeoTIFF"),
    ),
    "unknown domain id": Case(
        lambda r: None,
        DomainSelectionError,
        ("D099", "not in the dataset", "available: D080_2021, D081_2020"),
        options={"domains": ["D099"]},
        cli_args=("--domains", "D099"),
    ),
    "T differs between data and masks": Case(
        lambda r: np.save(r / f"{SEN}_masks.npy", np.load(r / f"{SEN}_masks.npy")[:-1]),
        DataFormatError,
        (
            "SEN2_sp_D081_2020-Z1_NN_masks.npy",
            "Sentinel-2 masks shape",
            "to match SEN2_sp_D081_2020-Z1_NN_data.npy",
        ),
    ),
    "T differs between data and products": Case(
        lambda r: (r / f"{SEN}_products.txt").write_text(
            "".join((r / f"{SEN}_products.txt").read_text().splitlines(keepends=True)[:-2])
        ),
        DataFormatError,
        ("products.txt", "number of products", "(T of SEN2_sp_D081_2020-Z1_NN_data.npy)"),
    ),
    "products with an unparsable date": Case(
        lambda r: (r / f"{SEN}_products.txt").write_text(
            (r / f"{SEN}_products.txt").read_text().replace("_MSIL2A_20", "_MSIL2A_xx", 1)
        ),
        DataFormatError,
        ("products.txt:1", "Sentinel-2 product name", "expected a name like"),
    ),
    "Sentinel-2 data in float32": Case(
        lambda r: np.save(r / f"{SEN}_data.npy", np.load(r / f"{SEN}_data.npy").astype(np.float32)),
        DataFormatError,
        ("data.npy", "Sentinel-2 data dtype", "expected int16 or uint16, found float32"),
    ),
    # FLAIR-2 stores elevation as uint8 and S2 as integers: a float raster (where NaN/inf could hide) is
    # refused by its type, before any value reaches a model.
    "elevation band with NaN (float32 raster)": Case(
        lambda r: _rewrite_tiff(
            r / IMG1, _with_nan(_read_tiff(r / IMG1).astype(np.float32), band=4), "float32"
        ),
        DataFormatError,
        ("IMG_000001.tif", "aerial patch dtype", "expected uint8, found float32"),
    ),
    "Sentinel-2 data with NaN and inf": Case(
        lambda r: np.save(
            r / f"{SEN}_data.npy", _with_nan(np.load(r / f"{SEN}_data.npy").astype(np.float32))
        ),
        DataFormatError,
        ("data.npy", "Sentinel-2 data dtype", "expected int16 or uint16, found float32"),
    ),
    "Sentinel-2 data with 4 bands": Case(
        lambda r: np.save(r / f"{SEN}_data.npy", np.load(r / f"{SEN}_data.npy")[:, :4]),
        DataFormatError,
        ("data.npy", "Sentinel-2 data shape", "expected (T, 10, H, W)"),
    ),
    "truncated Sentinel-2 array": Case(
        lambda r: _truncate(r / f"{SEN}_data.npy", 500),
        DataFormatError,
        ("data.npy", "cannot read the .npy array"),
    ),
    "every date cloudy with policy error": Case(
        lambda r: np.save(r / f"{SEN}_masks.npy", np.full_like(np.load(r / f"{SEN}_masks.npy"), 95)),
        NoClearDateError,
        ("masks.npy", "patch IMG_000001", "every one of"),
        options={"sentinel": SentinelOptions(no_clear_date="error")},
        cli_args=("--no-clear-date", "error"),
    ),
    "centroid JSON is not JSON": Case(
        lambda r: (r / "flair-2_centroids_sp_to_patch.json").write_text("{not json"),
        DataFormatError,
        ("flair-2_centroids_sp_to_patch.json", "cannot parse JSON"),
    ),
}


def _open_and_read_all(root: Path, options: dict) -> None:
    dataset = Flair2Dataset(root, **options)
    for index in range(len(dataset)):
        dataset[index]


@pytest.mark.parametrize("name", list(CASES))
def test_library_raises_a_clear_error(name, tiny_root):
    case = CASES[name]
    case.corrupt(tiny_root)
    with pytest.raises(case.error) as info:
        _open_and_read_all(tiny_root, case.options or {})
    message = str(info.value)
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.parametrize("name", list(CASES))
def test_cli_prints_one_line_and_exits_2(name, tiny_root, capsys):
    case = CASES[name]
    case.corrupt(tiny_root)
    code = main(["-q", "read", "--root", str(tiny_root), *case.cli_args])
    captured = capsys.readouterr()
    assert code == 2
    error_lines = [line for line in captured.err.splitlines() if line.startswith("damformer read: error:")]
    assert len(error_lines) == 1, captured.err
    assert case.fragments[0] in error_lines[0]
    assert "Traceback" not in captured.err


def test_missing_dataset_root_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "damformer", "read", "--root", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"damformer read: error: {tmp_path / 'nowhere'}: dataset folder does not exist"
    )


def test_corrupt_label_in_a_real_process(tiny_root):
    CASES["label values outside 1..19"].corrupt(tiny_root)
    result = subprocess.run(
        [sys.executable, "-m", "damformer", "-q", "read", "--root", str(tiny_root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "MSK_000001.tif: label values: expected 1..19, found values [0" in result.stderr


def test_bad_option_values_are_reported_not_raised(tiny_root, capsys):
    assert main(["-q", "read", "--root", str(tiny_root), "--sat-size", "39"]) == 2
    assert "crop_size: expected a positive even number" in capsys.readouterr().err


def test_a_clean_copy_reads_without_error(tiny_root):
    _open_and_read_all(tiny_root, {})  # the corruptions above are what breaks each case
