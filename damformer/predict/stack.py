"""A Sentinel-2 time series for predicting on aerial GeoTIFFs: one GeoTIFF stack and its dates file.

Checked on opening: band count against the dates, finite values, the 10 m pixel size, dates that
increase; then against the model: the value scale (reflectance x 10000, like the training data).
Day offsets start on May 15 of the year most dates fall in, as in training.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from damformer.data.sentinel import NUM_S2_BANDS, S2_PIXEL_M
from damformer.errors import DamformerError

log = logging.getLogger(__name__)


class PredictInputError(DamformerError):
    """An input does not fit the model (bands, CRS, Sentinel-2 stack)."""


@dataclass
class SentinelStack:
    """A Sentinel-2 time series as one GeoTIFF (T x 10 bands, date-major) and its dates."""

    path: Path
    data: np.ndarray  # (T, 10, H, W) float32
    day_offsets: np.ndarray  # (T,) days from the reference date (May 15 of the first date's year)
    crs: Any
    transform: Any

    @classmethod
    def open(cls, path: Path, dates_file: Path, *, reference: dt.date | None = None) -> SentinelStack:
        """Read the stack and its dates file, checking band count, values and pixel size."""
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
            raise PredictInputError(
                f"{path}: {int((~finite).sum())} NaN/inf values, first in band {band + 1} "
                f"(date {dates[band // NUM_S2_BANDS]}); fill them (e.g. gdal_fillnodata) or leave that date "
                "out of the stack and its dates file"
            )
        if abs(abs(transform.a) - S2_PIXEL_M) > 0.01 * S2_PIXEL_M:
            raise PredictInputError(f"{path}: pixel size {abs(transform.a):g} m, expected {S2_PIXEL_M:g} m")
        for line, (before, after) in enumerate(itertools.pairwise(dates), start=2):
            if after <= before:
                raise PredictInputError(
                    f"{dates_file}: line {line}: {after} is not after {before}: the dates must increase, one "
                    "per date of the stack and in its order, without repeats"
                )
        origin = reference or _origin(dates)
        offsets = np.array([(d - origin).days for d in dates], dtype=np.int64)
        return cls(path, data.reshape(len(dates), NUM_S2_BANDS, *data.shape[1:]), offsets, crs, transform)

    def check_scale(self, trained_mean: list[float] | None) -> None:
        """The stack holds reflectance x 10000 like the training data (per-band means within 10x of it).

        Without the training's means (older checkpoints): values all below 2 are reflectance in 0..1.
        """
        values = self.data[self.data > 0]
        mean = self.data.reshape(-1, NUM_S2_BANDS, *self.data.shape[-2:]).mean(axis=(0, 2, 3))
        if trained_mean:
            ratio = float(np.median(mean / np.maximum(np.asarray(trained_mean, dtype=np.float64), 1e-6)))
            wrong, found = not 0.1 <= ratio <= 10, f"{ratio:.3g}x the mean of the model's training data"
        else:
            wrong, found = values.size > 0 and float(values.max()) <= 2.0, "values all below 2"
        if wrong:
            raise PredictInputError(
                f"{self.path}: Sentinel-2 values average {float(mean.mean()):.4g} per band ({found}): the "
                "model reads L2A reflectance x 10000, as FLAIR-2 stores it; rescale the stack (e.g. "
                "gdal_calc.py -A STACK --calc='A*10000' for reflectance in 0..1)"
            )

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in the stack's CRS."""
        return bounds_of(self.transform, *self.data.shape[-2:])

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


def _origin(dates: Sequence[dt.date]) -> dt.date:
    """Training's origin of day offsets: May 15 of the year most dates fall in (the domain's year)."""
    years = Counter(d.year for d in dates)
    year = max(years, key=lambda y: (years[y], y))
    log.info(
        "Sentinel-2 day offsets from %s: May 15 of %d, the year %d of the %d dates fall in, as in training "
        "(--s2-reference sets another)",
        dt.date(year, 5, 15), year, years[year], len(dates),
    )  # fmt: skip
    return dt.date(year, 5, 15)


def bounds_of(transform: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a raster of ``height`` x ``width`` pixels."""
    return rasterio.transform.array_bounds(height, width, transform)  # west, south, east, north
