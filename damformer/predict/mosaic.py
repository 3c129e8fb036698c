"""Land-cover maps of aerial GeoTIFFs of any size: sliding windows, streamed, with nodata and Sentinel-2.

    damformer predict --checkpoint CKPT --src ortho.tif --out maps --window 512 --stride 384
    damformer predict --checkpoint CKPT --src ortho.tif --s2 stack.tif --s2-dates dates.txt --out maps

The raster is read and the maps are written window by window (:mod:`damformer.predict.streaming`):
memory depends on the window, the batch and the band width, not on the raster. What is checked before
any compute, each refusal one line naming the file:

- bands: a raster of the model's band count (5: R, G, B, NIR, elevation; 3 for an RGB model) is read
  as is; any other count needs ``--bands`` (1-based, in the model's order), never a silent guess;
- pixel type uint8 (FLAIR-2's 0..255), a CRS, and for +T models a Sentinel-2 stack in the same CRS
  that covers the raster with the margin its crops need (partial cover only with ``--allow-partial-s2``).

Nodata in, nodata out: pixels the input marks as nodata (its nodata value, mask or alpha band) are
``CLASS_NODATA`` (255) in the class map and NaN in the probabilities.

The Sentinel-2 stack holds what training fed the model: one date per month (monthly means of the
cloud-free acquisitions, dated the 15th) or individual dates, reflectance x 10000, bands B2 B3 B4 B5
B6 B7 B8 B8A B11 B12 per date. No cloud filter is applied here. Day offsets count from May 15 of the
first date's year, as in training (``--s2-reference`` sets another origin).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from damformer.data.sentinel import S2_PIXEL_M
from damformer.models.damformer import BAND_SETS
from damformer.models.factory import ModelConfig
from damformer.predict.geotiff import MapWriter, check_writable, write_quicklook_from
from damformer.predict.sliding import PatchPredictor
from damformer.predict.stack import PredictInputError, SentinelStack
from damformer.predict.streaming import SweepOptions, sweep, window_axis
from damformer.progress import progress_bar

log = logging.getLogger(__name__)


def s2_crop_size(model: ModelConfig, aerial_pixels: int, pixel_m: float) -> int:
    """The Sentinel-2 crop (10 m pixels, even) whose centre the model's footprint covers."""
    crop = aerial_pixels * pixel_m / (model.footprint * S2_PIXEL_M)
    size = max(2, round(crop / 2) * 2)
    smallest = 2 ** len(
        model.utae_widths
    )  # U-TAE halves the crop once per level after the first: >= 2 px left
    if size < smallest:
        raise PredictInputError(
            f"{aerial_pixels} px x {pixel_m:g} m patches or windows cover {model.footprint:g} of a "
            f"{crop:.1f}-pixel Sentinel-2 crop (model.footprint), and this model's U-TAE needs crops of at "
            f"least {smallest} pixels: predict patches or windows of at least "
            f"{smallest * model.footprint * S2_PIXEL_M / pixel_m:.0f} px (--window), the size the model was "
            "trained for"
        )
    if abs(size - crop) > 0.05 * crop:
        raise PredictInputError(
            f"model.footprint {model.footprint:g} and {aerial_pixels} px x {pixel_m:g} m windows give a "
            f"{crop:.2f}-pixel Sentinel-2 crop, not an even size: use --window so that the window covers "
            f"{model.footprint:g} of an even crop (the model was trained on such crops)"
        )
    return size


def _fmt(bounds: Sequence[float]) -> str:
    west, south, east, north = bounds
    return f"x {west:.0f}..{east:.0f}, y {south:.0f}..{north:.0f}"


@dataclass(frozen=True)
class MosaicOptions:
    """Sliding windows over large GeoTIFFs.

    Attributes:
        window, stride: window side and step (pixels); batch_size: windows per forward pass.
        stack: the Sentinel-2 stack (+T models).
        bands: 1-based bands of the raster in the model's order (None: the raster has exactly them).
        allow_partial_s2: accept a stack that covers the raster only in part (zeros elsewhere).
        band_width: columns swept at once (memory: see :mod:`damformer.predict.streaming`).
    """

    window: int = 512
    stride: int = 384
    batch_size: int = 4
    stack: SentinelStack | None = None
    bands: tuple[int, ...] | None = None
    allow_partial_s2: bool = False
    band_width: int = 2048


@dataclass(frozen=True)
class MosaicInput:
    """An aerial GeoTIFF checked against the model: which bands to read, its grid, whether it has nodata."""

    path: Path
    bands: tuple[int, ...]  # 1-based, in the model's order (R, G, B[, NIR, elevation])
    height: int
    width: int
    crs: Any
    transform: Any
    has_nodata: bool
    alpha: int | None = None  # 1-based band whose colour interpretation is alpha (0: transparent, masked)


def check_mosaic(path: Path, model: ModelConfig, options: MosaicOptions) -> MosaicInput:
    """Open an aerial GeoTIFF and check it against the model and the stack, before any compute."""
    try:
        with rasterio.open(path) as dataset:
            count, crs, dtypes = dataset.count, dataset.crs, set(dataset.dtypes)
            height, width, transform = dataset.height, dataset.width, dataset.transform
            flags = {flag for band in dataset.mask_flag_enums for flag in band}
            alpha = [i + 1 for i, kind in enumerate(dataset.colorinterp) if kind == ColorInterp.alpha]
            for row in {0, max(0, height - 16)}:  # a truncated file fails here, before any compute
                dataset.read(window=Window(0, row, width, min(16, height)))
    except rasterio.errors.RasterioError as exc:
        raise PredictInputError(f"{path}: cannot read the aerial GeoTIFF ({_first_line(exc)})") from None
    bands = _choose_bands(path, count, model, options.bands)
    if dtypes != {"uint8"}:
        raise PredictInputError(
            f"{path}: pixel type {', '.join(sorted(dtypes))}, expected uint8 like FLAIR-2's aerial patches "
            "(elevation included, scaled to 0..255): a float band could hold NaN and would not match what "
            "the model was trained on"
        )
    if crs is None:
        raise PredictInputError(f"{path}: no CRS; the maps would not be georeferenced")
    has_nodata = bool(flags - {rasterio.enums.MaskFlags.all_valid}) or bool(alpha)
    _check_window(path, options, height, width)
    stack = options.stack
    if model.temporal and stack is None:
        raise PredictInputError(
            f"{model.name} reads a Sentinel-2 series: give --s2 STACK.tif --s2-dates DATES.txt for {path}"
        )
    if model.temporal and stack is not None:
        if stack.crs != crs:
            raise PredictInputError(
                f"CRS mismatch: {path} is in {crs}, the Sentinel-2 stack {stack.path} in {stack.crs}: "
                "reproject the stack (gdalwarp -t_srs) to the aerial's CRS"
            )
        crop = s2_crop_size(model, options.window, abs(transform.a))
        needed = _crops_region(transform, height, width, options.window, crop * S2_PIXEL_M)
        _check_cover(path, needed, stack, options.allow_partial_s2)
    return MosaicInput(path, bands, height, width, crs, transform, has_nodata, alpha[0] if alpha else None)


def _check_window(path: Path, options: MosaicOptions, height: int, width: int) -> None:
    """A window no larger than the raster needs, and a batch of windows that fits in memory."""
    side = -(-max(height, width) // 32) * 32
    if options.window > side:
        raise PredictInputError(
            f"--window {options.window}: larger than {path} needs ({width} x {height} px: a window of {side} "
            "covers it whole); use --window " + str(min(side, 512))
        )
    # float32 inputs and logits, activations about twice as much again: a floor, not an estimate
    needed = options.batch_size * options.window**2 * 4 * (5 + 13) * 3
    available = _available_memory()
    if available is not None and needed > available:
        raise PredictInputError(
            f"--window {options.window} x --batch-size {options.batch_size}: at least "
            f"{needed / 2**30:.1f} GiB per batch, {available / 2**30:.1f} GiB available; use a smaller "
            "--window or --batch-size"
        )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _choose_bands(
    path: Path, count: int, model: ModelConfig, chosen: tuple[int, ...] | None
) -> tuple[int, ...]:
    needed = len(BAND_SETS[model.bands])
    order = "R, G, B" if needed == 3 else "R, G, B, NIR, elevation"
    if chosen is None:
        if count in (needed, 5):  # the model's bands, or FLAIR-2's five (R, G, B, NIR, elevation) in order
            return tuple(band + 1 for band in BAND_SETS[model.bands])
        raise PredictInputError(
            f"{path}: {count} band(s); the model ({model.name}) reads {needed} ({order}): choose them with "
            f"--bands (1-based, in that order, e.g. --bands {','.join(str(i) for i in range(1, needed + 1))})"
        )
    if len(chosen) != needed or not all(1 <= band <= count for band in chosen):
        raise PredictInputError(
            f"--bands {','.join(map(str, chosen))}: expected {needed} band numbers ({order}) between 1 and "
            f"{count} (the bands of {path})"
        )
    return chosen


def _crops_region(transform: Any, height: int, width: int, window: int, crop_m: float) -> tuple:
    """(west, south, east, north) that the Sentinel-2 crops of every window span together.

    Crops are centred on window centres: from the first window's centre to the last one's, plus half a
    crop, less half a 10 m pixel (a crop snaps to the stack's pixel grid).
    """
    last_row, last_col = max(height, window) - window, max(width, window) - window
    x0, y0 = transform @ (window / 2, window / 2)
    x1, y1 = transform @ (last_col + window / 2, last_row + window / 2)
    reach = crop_m / 2 - S2_PIXEL_M / 2
    return (min(x0, x1) - reach, min(y0, y1) - reach, max(x0, x1) + reach, max(y0, y1) + reach)


def _check_cover(path: Path, needed: tuple, stack: SentinelStack, allow_partial: bool) -> None:
    """The stack must hold every window's crop; a stack elsewhere, or in part, is refused."""
    have = stack.bounds
    overlap = min(needed[2], have[2]) > max(needed[0], have[0]) and min(needed[3], have[3]) > max(
        needed[1], have[1]
    )
    covered = have[0] <= needed[0] and have[1] <= needed[1] and have[2] >= needed[2] and have[3] >= needed[3]
    where = (
        f"{path} needs {_fmt(needed)} (the Sentinel-2 crops of its windows), the stack {stack.path} "
        f"covers {_fmt(have)}"
    )
    if not overlap:
        raise PredictInputError(f"the Sentinel-2 stack does not cover the aerial raster: {where}")
    if not covered and not allow_partial:
        raise PredictInputError(
            f"the Sentinel-2 stack covers the aerial raster only in part: {where}; windows outside it would "
            "read zeros (pass --allow-partial-s2 to accept that)"
        )


def predict_mosaic(
    mosaic: MosaicInput,
    model_config: ModelConfig,
    outputs: Any,
    options: MosaicOptions,
    *,
    predictor: PatchPredictor,
    show_progress: bool = True,
) -> Path:
    """Predict one aerial GeoTIFF into ``OUT/<name>.tif`` (and its probabilities / quicklook)."""
    window, stride = options.window, options.stride
    temporal = None
    if model_config.temporal and options.stack is not None:
        stack, transform = options.stack, mosaic.transform
        crop = s2_crop_size(model_config, window, abs(transform.a))

        def temporal(row: int, col: int, size: int) -> dict[str, np.ndarray]:
            x, y = transform @ (col + size / 2, row + size / 2)
            return {"s2": stack.crop(x, y, crop), "s2_day_offsets": stack.day_offsets}

    sweep_options = SweepOptions(window, stride, options.batch_size, band_width=options.band_width)
    height, width = mosaic.height, mosaic.width
    windows = len(window_axis(max(height, window), window, stride))
    per_band = [
        sum(
            1
            for c in window_axis(max(width, window), window, stride)
            if c < min(s + options.band_width, width) and c + window > s
        )
        for s in range(0, width, options.band_width)
    ]
    batches = windows * sum(-(-n // options.batch_size) for n in per_band)
    stem = mosaic.path.stem
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(mosaic.path) as source:

        def read(row: int, col: int, rows: int, cols: int) -> np.ndarray:
            try:
                return source.read(list(mosaic.bands), window=Window(col, row, cols, rows))
            except rasterio.errors.RasterioError as exc:  # damaged inside: the maps' temporaries go away
                raise PredictInputError(
                    f"{mosaic.path}: cannot read rows {row}..{row + rows} ({_first_line(exc)}); a truncated "
                    "or damaged file? Nothing was written for it"
                ) from None

        writer = MapWriter(
            outputs.folder / f"{stem}.tif",
            height=height,
            width=width,
            crs=mosaic.crs,
            transform=mosaic.transform,
            classes=outputs.classes(model_config.num_classes),
            probabilities_path=outputs.folder / f"{stem}_proba.tif" if outputs.probabilities else None,
            nodata=mosaic.has_nodata,
        )
        bar = (
            progress_bar(desc=mosaic.path.name, unit="batch", total=batches)
            if show_progress
            else nullcontext()
        )
        with writer, bar as advance:
            blocks = sweep(
                read, height, width, predictor, num_classes=model_config.num_classes, options=sweep_options,
                temporal=temporal, on_batch=(lambda: advance(1)) if advance else None,
            )  # fmt: skip
            for block in blocks:
                rows, cols = block.probabilities.shape[1:]
                valid = None
                if mosaic.has_nodata:
                    here = Window(block.col, block.row, cols, rows)
                    valid = source.dataset_mask(window=here) > 0
                    if mosaic.alpha is not None:  # whatever --bands: an alpha band masks the map
                        valid &= source.read(mosaic.alpha, window=here) > 0
                writer.write(block.row, block.col, block.probabilities, valid)
    if outputs.quicklook:
        write_quicklook_from(
            outputs.folder / f"{stem}.tif",
            outputs.folder / f"{stem}.png",
            outputs.classes(model_config.num_classes),
        )
    return outputs.folder / f"{stem}.tif"


def predict_mosaics(
    mosaics: Sequence[MosaicInput],
    model_config: ModelConfig,
    outputs: Any,
    options: MosaicOptions,
    *,
    predictor: PatchPredictor,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """This rank's share of the GeoTIFFs, after checking none of its outputs exists (unless overwrite)."""
    mine = list(mosaics[rank::world_size])
    check_writable(
        [p for mosaic in mine for p in outputs.paths(mosaic.path.stem)], overwrite=outputs.overwrite
    )
    return [
        predict_mosaic(mosaic, model_config, outputs, options, predictor=predictor, show_progress=rank == 0)
        for mosaic in mine
    ]
