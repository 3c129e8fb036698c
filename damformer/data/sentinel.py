"""Sentinel-2 time series of FLAIR-2: product dates, centroid crop, cloud/snow filter, monthly means.

Each zone has one superpatch shared by all its patches (flair2-format.md):

- ``*_data.npy``   (T, 10, H, W) int16/uint16 reflectance x 10000, bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12
- ``*_masks.npy``  (T, 2, H, W) uint8 probabilities 0..100, channel 0 snow, channel 1 cloud
- ``*_products.txt`` T product names, the acquisition date is the third field ``YYYYMMDDTHHMMSS``

The functions here are pure (arrays in, arrays out) so they can be tested on hand-made arrays.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from damformer.errors import DataFormatError, NoClearDateError, mismatch

S2_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
NUM_S2_BANDS = len(S2_BANDS)
S2_PIXEL_M = 10.0  # ground sampling of the FLAIR-2 Sentinel-2 superpatches
SNOW_CHANNEL = 0
CLOUD_CHANNEL = 1

# The sensing time is the third field (S2A_MSIL2A_<YYYYMMDDTHHMMSS>_...); the last field is the
# processing time, which must never be taken for it.
_PRODUCT_DATE = re.compile(r"^[^_]+_[^_]+_(\d{8})T\d{6}(?:_|$)")


@dataclass(frozen=True)
class SentinelOptions:
    """How the Sentinel-2 series of a patch is cropped, filtered and aggregated.

    Defaults are the FLAIR-2 baseline's: a 40 x 40 crop, cloud/snow filter on, monthly means on.

    Attributes:
        crop_size: side of the square crop (S2 pixels, 10 m) centred on the patch centroid; even.
        cloud_filter: drop dates whose crop is too cloudy or snowy.
        mask_threshold: a crop pixel counts as cloud (or snow) when its probability is >= this (0..100).
        max_cover: a date is kept when (snow pixels + cloud pixels) / crop area < this.
        monthly_average: replace the kept dates of each calendar month by their mean, dated the 15th.
        no_clear_date: when every date is filtered out: ``least_cloudy`` keeps the single date with the
            lowest cover (the sample stays usable), ``error`` raises :class:`NoClearDateError`.
        date_reference: origin of the day offsets fed to the temporal encoder: ``domain_year`` means
            May 15 of the domain's year (FLAIR-2 uses 2021-05-15 for its 2021 domains), or an ISO date.
    """

    crop_size: int = 40
    cloud_filter: bool = True
    mask_threshold: int = 60
    max_cover: float = 0.5
    monthly_average: bool = True
    no_clear_date: Literal["least_cloudy", "error"] = "least_cloudy"
    date_reference: str = "domain_year"

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.crop_size % 2:
            raise ValueError(
                f"crop_size: expected a positive even number of S2 pixels, found {self.crop_size}"
            )
        if not 0 <= self.mask_threshold <= 100:
            raise ValueError(f"mask_threshold: expected 0..100, found {self.mask_threshold}")
        if not 0.0 < self.max_cover <= 1.0:
            raise ValueError(f"max_cover: expected a fraction in (0, 1], found {self.max_cover}")
        if self.no_clear_date not in ("least_cloudy", "error"):
            raise ValueError(
                f"no_clear_date: expected 'least_cloudy' or 'error', found {self.no_clear_date!r}"
            )
        if self.date_reference != "domain_year":
            try:
                dt.date.fromisoformat(self.date_reference)
            except ValueError:
                raise ValueError(
                    f"date_reference: expected 'domain_year' or an ISO date YYYY-MM-DD, "
                    f"found {self.date_reference!r}"
                ) from None

    def reference_date(self, domain_year: int) -> dt.date:
        """Return the origin of day offsets for a domain of the given year."""
        if self.date_reference == "domain_year":
            return dt.date(domain_year, 5, 15)
        return dt.date.fromisoformat(self.date_reference)


def parse_product_dates(lines: Sequence[str], *, source: Path | str) -> list[dt.date]:
    """Parse acquisition dates from Sentinel-2 product names (one per line, blank lines ignored).

    The full date is parsed (not only month and day, as the baseline does) from the third field.

    Raises:
        DataFormatError: the third field is not ``YYYYMMDDTHHMMSS``, or the date is impossible.
    """
    dates = []
    for number, line in enumerate(lines, start=1):
        match = _PRODUCT_DATE.match(line.strip())
        if match is None:
            raise DataFormatError(
                mismatch(
                    f"{source}:{number}",
                    "Sentinel-2 product name",
                    expected="a name like S2A_MSIL2A_20210104T105431_N0214_R051_T31UDQ_20210104T120306",
                    found=repr(line.strip()[:80]),
                )
            )
        try:
            dates.append(dt.datetime.strptime(match.group(1), "%Y%m%d").date())
        except ValueError:
            raise DataFormatError(
                mismatch(
                    f"{source}:{number}",
                    "acquisition date",
                    expected="a valid YYYYMMDD",
                    found=match.group(1),
                )
            ) from None
    return dates


def read_products(path: Path) -> list[dt.date]:
    """Read a ``*_products.txt`` file and return its acquisition dates in file order."""
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read the Sentinel-2 products list: {exc}") from None
    return parse_product_dates([line for line in text.splitlines() if line.strip()], source=path)


def crop_window(
    centroid: tuple[int, int], *, crop_size: int, superpatch_hw: tuple[int, int]
) -> tuple[slice, slice] | None:
    """Return the (rows, cols) slices of a crop centred on ``centroid`` = (row, col), or None if it overflows.

    Same convention as the FLAIR-2 baseline: rows ``row - crop_size/2 .. row + crop_size/2`` (exclusive end).
    """
    row, col = centroid
    half = crop_size // 2
    height, width = superpatch_hw
    if row - half < 0 or col - half < 0 or row + half > height or col + half > width:
        return None
    return slice(row - half, row + half), slice(col - half, col + half)


def cloud_cover(masks_crop: np.ndarray, *, threshold: int) -> np.ndarray:
    """Fraction of snowy plus cloudy pixels per date, as the FLAIR-2 baseline counts it.

    Args:
        masks_crop: (T, 2, h, w) uint8 probabilities 0..100 (channel 0 snow, 1 cloud).
        threshold: probability at or above which a pixel counts.

    Returns:
        (T,) float64; may exceed 1 where a pixel is both snowy and cloudy (both are counted).
    """
    area = masks_crop.shape[-2] * masks_crop.shape[-1]
    counts = (masks_crop >= threshold).sum(axis=(1, 2, 3))
    return counts / float(area)


def select_clear_dates(cover: np.ndarray, *, max_cover: float, policy: str, source: str) -> np.ndarray:
    """Return the indices of dates to keep given their cloud/snow cover (ascending order).

    Raises:
        NoClearDateError: no date passes and ``policy`` is ``error``.
    """
    keep = np.flatnonzero(cover < max_cover)
    if keep.size:
        return keep
    if policy == "least_cloudy":
        return np.array([int(np.argmin(cover))])
    raise NoClearDateError(
        f"{source}: every one of {cover.size} Sentinel-2 dates is cloudy/snowy over the crop "
        f"(lowest cover {cover.min():.2f} >= max_cover {max_cover}); set no_clear_date='least_cloudy' "
        "to keep the least cloudy date"
    )


def monthly_means(
    s2: np.ndarray, masks: np.ndarray, dates: Sequence[dt.date]
) -> tuple[np.ndarray, np.ndarray, list[dt.date]]:
    """Average the dates of each calendar month (year and month), each mean dated the 15th.

    Args:
        s2: (T, C, h, w) float32 reflectance of the kept dates, in date order.
        masks: (T, 2, h, w) uint8 mask probabilities of the same dates.
        dates: the T acquisition dates.

    Returns:
        (M, C, h, w) float32 means, (M, 2, h, w) uint8 rounded mean masks, and M dates (the 15th of each
        month), in chronological order.
    """
    months = sorted({(d.year, d.month) for d in dates})
    month_of = np.array([months.index((d.year, d.month)) for d in dates])
    s2_out = np.empty((len(months), *s2.shape[1:]), dtype=np.float32)
    masks_out = np.empty((len(months), *masks.shape[1:]), dtype=np.uint8)
    for index in range(len(months)):
        members = month_of == index
        # float64 accumulation: a mean of int reflectances must not lose precision before the cast
        s2_out[index] = s2[members].mean(axis=0, dtype=np.float64)
        masks_out[index] = np.rint(masks[members].mean(axis=0, dtype=np.float64)).astype(np.uint8)
    return s2_out, masks_out, [dt.date(year, month, 15) for year, month in months]


def day_offsets(dates: Sequence[dt.date], reference: dt.date) -> np.ndarray:
    """Return (T,) int32 day offsets of ``dates`` relative to ``reference`` (negative before it)."""
    return np.array([(d - reference).days for d in dates], dtype=np.int32)
