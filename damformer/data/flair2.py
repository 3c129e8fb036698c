"""FLAIR-2 reader: typed samples (aerial patch, label, Sentinel-2 crop) from the real on-disk layout.

Example::

    from damformer.data import Flair2Dataset, SentinelOptions
    dataset = Flair2Dataset("/data/FLAIR2", domains=["south"], sentinel=SentinelOptions(crop_size=40))
    sample = dataset[0]
    sample.aerial.shape   # (5, 512, 512) uint8: R, G, B, NIR, elevation
    sample.s2.shape       # (T, 10, 40, 40) float32 reflectance x 10000, cloud-filtered, monthly means

Everything that can be checked without reading pixels (folders, companion files, Sentinel-2 array
headers and lengths, centroids inside the superpatch) is checked when the dataset is opened, so a bad
copy fails at once with a message naming the file, never half-way through an epoch.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError

from damformer.data.classes import invalid_raw_values, remap_labels
from damformer.data.domains import domain_year
from damformer.data.layout import Flair2Layout, PatchRef, Split
from damformer.data.sentinel import (
    NUM_S2_BANDS,
    SentinelOptions,
    cloud_cover,
    crop_window,
    day_offsets,
    monthly_means,
    read_products,
    select_clear_dates,
)
from damformer.errors import DataFormatError, mismatch

log = logging.getLogger(__name__)

AERIAL_BANDS: tuple[str, ...] = ("red", "green", "blue", "nir", "elevation")
NUM_AERIAL_BANDS = len(AERIAL_BANDS)
_S2_DTYPES = (np.dtype(np.int16), np.dtype(np.uint16))


@dataclass(frozen=True)
class Flair2Sample:
    """One FLAIR-2 patch with everything DAM-Former reads from it.

    Attributes:
        patch_id: ``IMG_000001``.
        domain, zone: ``D004_2021``, ``Z1_NN``.
        aerial: (5, H, W) uint8, bands R, G, B, NIR, elevation (0..255, as stored).
        label: (H, W) uint8 in 0..12 (13-class setting, 12 = other), or None when labels are not read.
        crs: the GeoTIFF's CRS as a string, ``EPSG:2154`` for FLAIR-2.
        transform: the GeoTIFF's affine transform (0.2 m pixels for FLAIR-2).
        s2: (T, 10, S, S) float32 reflectance x 10000 (the files' scale; divide by 10000 to normalise),
            bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12; cloud-filtered and, by default, monthly means.
            None when Sentinel-2 is not read.
        s2_masks: (T, 2, S, S) uint8 snow (0) and cloud (1) probabilities of the same dates (monthly:
            rounded means).
        s2_dates: the T dates (monthly: the 15th of each month).
        s2_day_offsets: (T,) int32 days from the reference date (:class:`SentinelOptions`).
        s2_num_acquisitions: dates in the zone's series before filtering.
        s2_num_clear: dates that passed the cloud/snow filter (before monthly averaging).
        centroid: (row, col) of the patch centre in the zone's superpatch.
        metadata: the patch's entry of the metadata JSON (empty if absent).
    """

    patch_id: str
    domain: str
    zone: str
    aerial: np.ndarray
    label: np.ndarray | None
    crs: str
    transform: Affine
    s2: np.ndarray | None = None
    s2_masks: np.ndarray | None = None
    s2_dates: tuple[dt.date, ...] = ()
    s2_day_offsets: np.ndarray | None = None
    s2_num_acquisitions: int = 0
    s2_num_clear: int = 0
    centroid: tuple[int, int] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _ZoneSeries:
    """A zone's superpatch arrays (memory-mapped) and dates, validated once."""

    data: np.ndarray
    masks: np.ndarray
    dates: list[dt.date]
    files: Any


class Flair2Dataset:
    """Map-style dataset over the FLAIR-2 patches of selected domains.

    Args:
        root: dataset folder (see :class:`Flair2Layout` for the folders it looks for).
        split: ``train`` or ``test``.
        domains: ids (``D080_2021``), prefixes (``D080``), presets (``north``/``south``) or ``all``.
        sentinel: Sentinel-2 crop/filter/averaging options.
        with_labels: read labels (the unlabelled target of UDA may skip them).
        with_s2: read the Sentinel-2 series (aerial-only models may skip it).
        patch_size: expected aerial side in pixels (512 for FLAIR-2); None accepts any square size.
        **layout_paths: explicit ``aerial_dir``, ``labels_dir``, ``sen_dir``, ``centroids_json``,
            ``metadata_json`` (see :class:`Flair2Layout`).

    Raises:
        DamformerError subclasses naming the file at fault (see module docstring).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        split: Split = "train",
        domains: Sequence[str] | None = None,
        sentinel: SentinelOptions | None = None,
        with_labels: bool = True,
        with_s2: bool = True,
        patch_size: int | None = None,
        **layout_paths: Path | str | None,
    ) -> None:
        self.layout = Flair2Layout(root, split=split, **layout_paths)
        self.sentinel = sentinel or SentinelOptions()
        self.with_labels = with_labels
        self.with_s2 = with_s2
        self.patch_size = patch_size
        self.patches = self.layout.discover(domains, with_labels=with_labels, with_s2=with_s2)
        self.domains = sorted({p.domain for p in self.patches})
        self.metadata = self.layout.load_metadata()
        self._zones: dict[str, _ZoneSeries] = {}
        self.centroids: dict[str, tuple[int, int]] = {}
        if with_s2:
            self._validate_s2()

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> Flair2Sample:
        return self.read(self.patches[index])

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps would be pickled as full copies when worker processes are spawned: reopen instead.
        state = self.__dict__.copy()
        state["_zones"] = {}
        return state

    # --------------------------------------------------------------- reading
    def read(self, patch: PatchRef) -> Flair2Sample:
        """Read one patch (aerial, label, Sentinel-2 crop, metadata)."""
        aerial, crs, transform = self._read_aerial(patch.aerial_path)
        label = (
            self._read_label(patch.label_path, aerial.shape[1:], crs, transform) if self.with_labels else None
        )
        sample = Flair2Sample(
            patch_id=patch.patch_id,
            domain=patch.domain,
            zone=patch.zone,
            aerial=aerial,
            label=label,
            crs=crs,
            transform=transform,
            metadata=self.metadata.get(patch.patch_id, {}),
        )
        if not self.with_s2:
            return sample
        return _with_s2(sample, **self._read_s2(patch))

    def _read_aerial(self, path: Path) -> tuple[np.ndarray, str, Affine]:
        array, crs, transform = _read_geotiff(path, what="aerial patch", bands=NUM_AERIAL_BANDS)
        height, width = array.shape[1:]
        if self.patch_size is not None and (height, width) != (self.patch_size, self.patch_size):
            raise DataFormatError(
                mismatch(
                    path,
                    "aerial patch size",
                    expected=f"{self.patch_size} x {self.patch_size}",
                    found=f"{height} x {width}",
                )
            )
        if height != width:
            raise DataFormatError(
                mismatch(path, "aerial patch size", expected="a square", found=f"{height} x {width}")
            )
        if crs is None:
            raise DataFormatError(f"{path}: aerial patch has no CRS (FLAIR-2 patches are in EPSG:2154)")
        return array, crs, transform

    @staticmethod
    def _read_label(path: Path | None, size: tuple[int, ...], crs: str, transform: Affine) -> np.ndarray:
        if path is None:  # discover() resolves every label path when with_labels is set
            raise DataFormatError("internal: a label was read for a dataset opened without labels")
        array, label_crs, label_transform = _read_geotiff(path, what="label", bands=1)
        if array.shape[1:] != size:
            raise DataFormatError(
                mismatch(
                    path,
                    "label size",
                    expected=f"{size[0]} x {size[1]} (as its aerial patch)",
                    found=f"{array.shape[1]} x {array.shape[2]}",
                )
            )
        if label_crs is not None and (label_crs != crs or not label_transform.almost_equals(transform)):
            raise DataFormatError(
                mismatch(
                    path,
                    "label georeferencing",
                    expected=f"{crs} {tuple(transform)[:6]} (as its aerial patch)",
                    found=f"{label_crs} {tuple(label_transform)[:6]}",
                )
            )
        bad = invalid_raw_values(array[0])
        if bad:
            raise DataFormatError(mismatch(path, "label values", expected="1..19", found=f"values {bad}"))
        return remap_labels(array[0])

    def _read_s2(self, patch: PatchRef) -> dict[str, Any]:
        zone = self._zone(patch)
        rows, cols = crop_window(
            self.centroids[patch.patch_id],
            crop_size=self.sentinel.crop_size,
            superpatch_hw=zone.data.shape[2:],
        ) or (slice(0), slice(0))  # validated at open: the window always fits
        options = self.sentinel
        masks_all = np.asarray(zone.masks[:, :, rows, cols])
        keep = np.arange(len(zone.dates))
        if options.cloud_filter:
            cover = cloud_cover(masks_all, threshold=options.mask_threshold)
            keep = select_clear_dates(
                cover,
                max_cover=options.max_cover,
                policy=options.no_clear_date,
                source=f"{zone.files.masks} (patch {patch.patch_id})",
            )
        s2 = np.asarray(zone.data[keep][:, :, rows, cols], dtype=np.float32)
        masks = masks_all[keep]
        dates = [zone.dates[i] for i in keep]
        num_clear = len(dates)
        if options.monthly_average:
            s2, masks, dates = monthly_means(s2, masks, dates)
        reference = options.reference_date(domain_year(patch.domain))
        return {
            "s2": s2,
            "s2_masks": masks,
            "s2_dates": tuple(dates),
            "s2_day_offsets": day_offsets(dates, reference),
            "s2_num_acquisitions": len(zone.dates),
            "s2_num_clear": num_clear,
            "centroid": self.centroids[patch.patch_id],
        }

    # ------------------------------------------------------------ validation
    def _zone(self, patch: PatchRef) -> _ZoneSeries:
        series = self._zones.get(patch.zone_key)
        if series is None:
            series = _open_zone(self.layout, patch)
            self._zones[patch.zone_key] = series
        return series

    def _validate_s2(self) -> None:
        """Open every zone's arrays (headers only) and check every centroid before any pixel is read."""
        centroids_raw = self.layout.load_centroids()
        source = self.layout.centroids_json
        for patch in self.patches:
            zone = self._zone(patch)
            centroid = _parse_centroid(centroids_raw.get(patch.centroid_key), patch, source)
            height, width = zone.data.shape[2:]
            row, col = centroid
            if not (0 <= row < height and 0 <= col < width):
                raise DataFormatError(
                    mismatch(
                        source,
                        f"centroid of {patch.centroid_key}",
                        expected=f"(row, col) inside the {height} x {width} superpatch "
                        f"of {zone.files.data.name}",
                        found=f"{list(centroid)}",
                    )
                )
            if (
                crop_window(centroid, crop_size=self.sentinel.crop_size, superpatch_hw=(height, width))
                is None
            ):
                raise DataFormatError(
                    mismatch(
                        source,
                        f"centroid of {patch.centroid_key}",
                        expected=f"a {self.sentinel.crop_size} x {self.sentinel.crop_size} crop inside the "
                        f"{height} x {width} superpatch of {zone.files.data.name}",
                        found=f"centre {list(centroid)}, too close to the edge",
                        fix="Use a smaller crop size (--sat-size)",
                    )
                )
            self.centroids[patch.patch_id] = centroid


def _with_s2(sample: Flair2Sample, **fields: Any) -> Flair2Sample:
    return Flair2Sample(**{**sample.__dict__, **fields})


def _read_geotiff(path: Path, *, what: str, bands: int) -> tuple[np.ndarray, str | None, Affine]:
    """Read a whole uint8 GeoTIFF, checking band count and dtype; errors name the file."""
    try:
        with rasterio.open(path) as src:
            if src.count != bands:
                raise DataFormatError(mismatch(path, f"{what} band count", expected=bands, found=src.count))
            dtypes = set(src.dtypes)
            if dtypes != {"uint8"}:
                raise DataFormatError(
                    mismatch(path, f"{what} dtype", expected="uint8", found=", ".join(sorted(dtypes)))
                )
            array = src.read()
            crs = src.crs.to_string() if src.crs else None
            transform = src.transform
    except RasterioError as exc:
        raise DataFormatError(
            f"{path}: cannot read {what} GeoTIFF (truncated or not a GeoTIFF?): {exc}"
        ) from None
    return array, crs, transform


def _parse_centroid(value: Any, patch: PatchRef, source: Path | None) -> tuple[int, int]:
    if value is None:
        raise DataFormatError(
            f"{source}: no centroid for {patch.centroid_key} (patch {patch.aerial_path}); "
            "the JSON must map every patch file name to [row, col]"
        )
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer() for v in value
        )
    )
    if not ok:
        raise DataFormatError(
            mismatch(
                source or "centroid JSON",
                f"centroid of {patch.centroid_key}",
                expected="[row, col] integers",
                found=repr(value),
            )
        )
    return int(value[0]), int(value[1])


def _open_zone(layout: Flair2Layout, patch: PatchRef) -> _ZoneSeries:
    """Memory-map a zone's Sentinel-2 arrays and check their headers against each other and the products."""
    files = layout.zone_s2_files(patch)
    data = _load_npy(files.data)
    masks = _load_npy(files.masks)
    dates = read_products(files.products)
    if data.ndim != 4 or data.shape[1] != NUM_S2_BANDS:
        raise DataFormatError(
            mismatch(
                files.data, "Sentinel-2 data shape", expected=f"(T, {NUM_S2_BANDS}, H, W)", found=data.shape
            )
        )
    if data.dtype not in _S2_DTYPES:
        raise DataFormatError(
            mismatch(files.data, "Sentinel-2 data dtype", expected="int16 or uint16", found=data.dtype)
        )
    if masks.ndim != 4 or masks.shape[1] != 2 or masks.dtype != np.uint8:
        raise DataFormatError(
            mismatch(
                files.masks,
                "Sentinel-2 masks",
                expected="(T, 2, H, W) uint8",
                found=f"{masks.shape} {masks.dtype}",
            )
        )
    if masks.shape[0] != data.shape[0] or masks.shape[2:] != data.shape[2:]:
        raise DataFormatError(
            mismatch(
                files.masks,
                "Sentinel-2 masks shape",
                expected=f"{(data.shape[0], 2, *data.shape[2:])} to match {files.data.name}",
                found=masks.shape,
            )
        )
    if len(dates) != data.shape[0]:
        raise DataFormatError(
            mismatch(
                files.products,
                "number of products",
                expected=f"{data.shape[0]} (T of {files.data.name})",
                found=len(dates),
            )
        )
    if data.shape[0] == 0:
        raise DataFormatError(f"{files.data}: Sentinel-2 series has no date (T = 0)")
    return _ZoneSeries(data=data, masks=masks, dates=dates, files=files)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataFormatError(
            f"{path}: cannot read the .npy array (truncated or not a .npy file?): {exc}"
        ) from None
