"""damformer predict: land-cover maps for FLAIR-2 patches or large aerial GeoTIFF mosaics.

Two kinds of input:

- a FLAIR-2 folder (the real layout): every patch of the selected split and domains, with its own
  Sentinel-2 series for +T models (cropped around the patch centroid with the size the model's
  footprint implies, cloud-filtered and month-averaged as for training). Labels, when present, are
  scored: the printed mIoU is the one ``damformer evaluate`` gives on shards of the same patches.
- aerial GeoTIFFs (any size): sliding windows with overlap and blending. A +T model also needs a
  Sentinel-2 stack (``--s2 STACK.tif --s2-dates DATES.txt``): a GeoTIFF of T x 10 bands (date-major,
  bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12, reflectance x 10000) in the aerial's CRS.

Every check (checkpoint, bands, CRS, existing outputs) runs before any compute. Under torchrun the
inputs are split across the ranks and each rank writes its own maps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from damformer.config import ConfigError, build_section
from damformer.data.classes import FLAIR_CLASSES
from damformer.data.sentinel import NUM_S2_BANDS, S2_PIXEL_M
from damformer.engine.checkpoint import load_checkpoint
from damformer.errors import DamformerError
from damformer.eval.metrics import ConfusionMatrix, SegmentationScores, scores
from damformer.models.damformer import BAND_SETS
from damformer.models.factory import ModelConfig, build_model
from damformer.predict.geotiff import check_writable, write_class_map, write_probabilities, write_quicklook
from damformer.predict.sliding import PatchPredictor, sliding_probabilities
from damformer.progress import progress

log = logging.getLogger(__name__)


class PredictInputError(DamformerError):
    """An input does not fit the model (bands, CRS, Sentinel-2 stack)."""


@dataclass(frozen=True)
class Outputs:
    """Which files to write per input, and whether existing ones may be replaced."""

    folder: Path
    probabilities: bool = False
    quicklook: bool = False
    overwrite: bool = False

    def paths(self, stem: str) -> list[Path]:
        """The files written for one input (``stem``: its name, or its FLAIR-2 sub-path)."""
        paths = [self.folder / f"{stem}.tif"]
        if self.probabilities:
            paths.append(self.folder / f"{stem}_proba.tif")
        if self.quicklook:
            paths.append(self.folder / f"{stem}.png")
        return paths

    def write(self, stem: str, probabilities: np.ndarray, *, crs: Any, transform: Any) -> np.ndarray:
        """Write the maps of one input from its (K, H, W) probabilities; returns the class map."""
        classes = FLAIR_CLASSES[: probabilities.shape[0]]
        prediction = probabilities.argmax(axis=0).astype(np.uint8)
        write_class_map(
            self.folder / f"{stem}.tif", prediction, crs=crs, transform=transform, classes=classes
        )
        if self.probabilities:
            write_probabilities(
                self.folder / f"{stem}_proba.tif",
                probabilities,
                crs=crs,
                transform=transform,
                classes=classes,
            )
        if self.quicklook:
            write_quicklook(self.folder / f"{stem}.png", prediction, classes)
        return prediction


def load_model(checkpoint: Path, *, teacher: bool = False) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """The student (or EMA teacher) of a checkpoint, with its model config and the checkpoint state."""
    state = load_checkpoint(checkpoint)
    model_config = build_section(ModelConfig, state["config"]["model"], "model")
    if model_config.num_classes != len(FLAIR_CLASSES):
        raise ConfigError(
            f"{checkpoint}: a model of {model_config.num_classes} classes; maps, colours and scores here are "
            f"for the {len(FLAIR_CLASSES)} FLAIR classes"
        )
    # The checkpoint holds every weight: the ImageNet file named at training time need not exist here.
    model = build_model(dataclasses.replace(model_config, pretrained=None))
    prefix = "teacher.model." if teacher else "student."
    weights = {k.removeprefix(prefix): v for k, v in state["uda"].items() if k.startswith(prefix)}
    if not weights:
        raise ConfigError(f"{checkpoint}: no {'teacher' if teacher else 'student'} weights in it")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise ConfigError(
            f"{checkpoint}: its weights do not fit its own model config ({first[0].strip()})"
        ) from None
    return model, model_config, state


def s2_crop_size(model: ModelConfig, aerial_pixels: int, pixel_m: float) -> int:
    """The Sentinel-2 crop (10 m pixels, even) whose centre the model's footprint covers."""
    crop = aerial_pixels * pixel_m / (model.footprint * S2_PIXEL_M)
    size = max(2, round(crop / 2) * 2)
    if abs(size - crop) > 0.05 * crop:
        raise PredictInputError(
            f"model.footprint {model.footprint:g} and {aerial_pixels} px x {pixel_m:g} m windows give a "
            f"{crop:.2f}-pixel Sentinel-2 crop, not an even size: use --window so that the window covers "
            f"{model.footprint:g} of an even crop (the model was trained on such crops)"
        )
    return size


# -- FLAIR-2 patches ------------------------------------------------------------------------------


def predict_flair2(
    root: Path,
    model: torch.nn.Module,
    model_config: ModelConfig,
    outputs: Outputs,
    *,
    predictor: PatchPredictor,
    split: str = "test",
    domains: Sequence[str] | None = None,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SegmentationScores | None:
    """Predict every patch of a FLAIR-2 folder into ``OUT/DOMAIN/ZONE/PRED_xxx.tif``; scores if labelled."""
    from damformer.data.augment import training_sample
    from damformer.data.collate import collate_samples
    from damformer.data.flair2 import Flair2Dataset
    from damformer.data.layout import Flair2Layout
    from damformer.data.sentinel import SentinelOptions

    labelled = Flair2Layout(root, split=split).labels_dir is not None
    probe = Flair2Dataset(root, split=split, domains=domains, with_labels=False, with_s2=False)
    if not probe.patches:
        raise PredictInputError(f"{root}: no {split} patches in domains {domains or 'all'}")
    first = probe[0]
    _check_bands(first.aerial.shape[0], model_config, where=str(probe.patches[0].aerial_path))
    sentinel = None
    if model_config.temporal:
        crop = s2_crop_size(model_config, first.aerial.shape[-1], abs(first.transform.a))
        sentinel = SentinelOptions(crop_size=crop)
    dataset = Flair2Dataset(
        root,
        split=split,
        domains=domains,
        sentinel=sentinel,
        with_labels=labelled,
        with_s2=model_config.temporal,
    )
    mine = list(range(rank, len(dataset), world_size))
    stems = {i: _patch_stem(dataset.patches[i]) for i in mine}
    check_writable([p for i in mine for p in outputs.paths(stems[i])], overwrite=outputs.overwrite)
    matrix = ConfusionMatrix(model_config.num_classes) if labelled else None
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = progress(chunks, desc="predict", unit="batch", total=len(chunks)) if rank == 0 else chunks
    for chunk in bar:
        samples = [dataset[i] for i in chunk]
        batch = collate_samples([training_sample(sample) for sample in samples])
        probabilities = predictor(batch).numpy()
        for index, sample, probs in zip(chunk, samples, probabilities, strict=True):
            prediction = outputs.write(stems[index], probs, crs=sample.crs, transform=sample.transform)
            if matrix is not None and sample.label is not None:
                matrix.update(torch.from_numpy(prediction)[None], torch.from_numpy(sample.label)[None])
    if matrix is None:
        return None
    total = matrix.matrix if reduce is None else reduce(matrix.matrix)
    return scores(total)


def _patch_stem(patch: Any) -> str:
    """``D004_2021/Z1_NN/PRED_000123``: the FLAIR-2 folder structure, PRED_ for IMG_."""
    name = patch.patch_id.replace("IMG_", "PRED_", 1)
    return f"{patch.domain}/{patch.zone}/{name}"


def _check_bands(found: int, model: ModelConfig, *, where: str) -> None:
    needed = max(BAND_SETS[model.bands]) + 1
    if found < needed:
        raise PredictInputError(
            f"{where}: {found} band(s), but the model ({model.name}) reads {needed} "
            f"({'R, G, B' if needed == 3 else 'R, G, B, NIR, elevation'})"
        )


# -- large aerial GeoTIFFs ------------------------------------------------------------------------


@dataclass
class SentinelStack:
    """A Sentinel-2 time series as one GeoTIFF (T x 10 bands, date-major) and its dates."""

    path: Path
    data: np.ndarray  # (T, 10, H, W) float32
    day_offsets: np.ndarray  # (T,) days from 1 January of the first date's year
    crs: Any
    transform: Any

    @classmethod
    def open(cls, path: Path, dates_file: Path) -> SentinelStack:
        """Read the stack and its dates file, checking band count and pixel size."""
        try:
            lines = [line.strip() for line in dates_file.read_text().splitlines() if line.strip()]
            dates = [dt.date.fromisoformat(line) for line in lines]
        except (OSError, ValueError) as exc:
            raise PredictInputError(
                f"{dates_file}: expected one ISO date (YYYY-MM-DD) per line ({exc})"
            ) from None
        try:
            with rasterio.open(path) as dataset:
                data, crs, transform = dataset.read().astype(np.float32), dataset.crs, dataset.transform
        except rasterio.errors.RasterioError as exc:
            raise PredictInputError(f"{path}: cannot read the Sentinel-2 stack ({exc})") from None
        if not dates or data.shape[0] != len(dates) * NUM_S2_BANDS:
            raise PredictInputError(
                f"{path}: {data.shape[0]} bands, expected {NUM_S2_BANDS} per date x {len(dates)} dates "
                f"(from {dates_file})"
            )
        finite = np.isfinite(data)
        if not finite.all():
            band = int(np.argmin(finite.reshape(finite.shape[0], -1).all(axis=1)))
            date = dates[band // NUM_S2_BANDS]  # the band count was checked against the dates just above
            raise PredictInputError(
                f"{path}: {int((~finite).sum())} NaN/inf values, first in band {band + 1} (date {date}); "
                "fill them (e.g. gdal_fillnodata) or leave that date out of the stack and its dates file"
            )
        if abs(abs(transform.a) - S2_PIXEL_M) > 0.01 * S2_PIXEL_M:
            raise PredictInputError(f"{path}: pixel size {abs(transform.a):g} m, expected {S2_PIXEL_M:g} m")
        origin = dt.date(dates[0].year, 1, 1)
        offsets = np.array([(d - origin).days for d in dates], dtype=np.int64)
        return cls(path, data.reshape(len(dates), NUM_S2_BANDS, *data.shape[1:]), offsets, crs, transform)

    def crop(self, x: float, y: float, size: int) -> np.ndarray:
        """(T, 10, size, size) centred on map coordinates (x, y); zeros outside the stack."""
        col, row = ~self.transform @ (x, y)
        top, left = round(row) - size // 2, round(col) - size // 2
        out = np.zeros((*self.data.shape[:2], size, size), dtype=np.float32)
        height, width = self.data.shape[-2:]
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + size, height), min(left + size, width)
        if r1 > r0 and c1 > c0:
            out[..., r0 - top : r1 - top, c0 - left : c1 - left] = self.data[..., r0:r1, c0:c1]
        return out


def check_mosaic(path: Path, model: ModelConfig, stack: SentinelStack | None) -> None:
    """Bands and CRS of one aerial GeoTIFF against the model and the stack (before any compute)."""
    try:
        with rasterio.open(path) as dataset:
            count, crs, dtypes = dataset.count, dataset.crs, set(dataset.dtypes)
    except rasterio.errors.RasterioError as exc:
        raise PredictInputError(f"{path}: cannot open the aerial GeoTIFF ({exc})") from None
    _check_bands(count, model, where=str(path))
    if dtypes != {"uint8"}:
        raise PredictInputError(
            f"{path}: pixel type {', '.join(sorted(dtypes))}, expected uint8 like FLAIR-2's aerial patches "
            "(elevation included, scaled to 0..255): a float band could hold NaN and would not match "
            "what the model was trained on"
        )
    if crs is None:
        raise PredictInputError(f"{path}: no CRS; the maps would not be georeferenced")
    if stack is not None and stack.crs != crs:
        raise PredictInputError(
            f"CRS mismatch: {path} is in {crs}, the Sentinel-2 stack {stack.path} in {stack.crs}: "
            "reproject the stack (gdalwarp -t_srs) to the aerial's CRS"
        )
    if model.temporal and stack is None:
        raise PredictInputError(
            f"{model.name} reads a Sentinel-2 series: give --s2 STACK.tif --s2-dates DATES.txt for {path}"
        )


@dataclass(frozen=True)
class MosaicOptions:
    """Sliding windows over large GeoTIFFs: side and step (pixels), windows per pass, Sentinel-2 stack."""

    window: int = 512
    stride: int = 384
    batch_size: int = 4
    stack: SentinelStack | None = None


def predict_mosaic(
    path: Path,
    model_config: ModelConfig,
    outputs: Outputs,
    options: MosaicOptions,
    *,
    predictor: PatchPredictor,
    show_progress: bool = True,
) -> Path:
    """Predict one aerial GeoTIFF (sliding windows) into ``OUT/<name>.tif``."""
    with rasterio.open(path) as dataset:
        aerial = dataset.read()
        crs, transform = dataset.crs, dataset.transform
    if aerial.dtype != np.uint8:
        raise PredictInputError(
            f"{path}: dtype {aerial.dtype}, expected uint8 (FLAIR-2 aerial values 0..255)"
        )
    temporal = None
    stack = options.stack
    if model_config.temporal and stack is not None:
        crop = s2_crop_size(model_config, options.window, abs(transform.a))

        def temporal(row: int, col: int, size: int) -> dict[str, np.ndarray]:
            x, y = transform @ (col + size / 2, row + size / 2)
            return {"s2": stack.crop(x, y, crop), "s2_day_offsets": stack.day_offsets}

    probabilities = sliding_probabilities(
        aerial,
        predictor,
        num_classes=model_config.num_classes,
        window=options.window,
        stride=options.stride,
        batch_size=options.batch_size,
        temporal=temporal,
        progress=(lambda it: progress(it, desc=path.name, unit="batch")) if show_progress else None,
    )
    outputs.write(path.stem, probabilities, crs=crs, transform=transform)
    return outputs.folder / f"{path.stem}.tif"


def predict_mosaics(
    paths: Sequence[Path],
    model_config: ModelConfig,
    outputs: Outputs,
    options: MosaicOptions,
    *,
    predictor: PatchPredictor,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """This rank's share of the GeoTIFFs, after checking none of its outputs exists (unless overwrite)."""
    mine = list(paths[rank::world_size])
    check_writable([p for path in mine for p in outputs.paths(path.stem)], overwrite=outputs.overwrite)
    return [
        predict_mosaic(path, model_config, outputs, options, predictor=predictor, show_progress=rank == 0)
        for path in mine
    ]
