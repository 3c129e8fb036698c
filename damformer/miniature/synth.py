"""Miniature FLAIR-2 writer: the demo and test data, in exactly the real layout and file formats.

``damformer synth --out DIR`` writes, for a few real "south" and "north" domain ids, several zones each::

    DIR/flair_aerial_train/D081_2020/Z1_NN/img/IMG_000001.tif     5-band uint8 GeoTIFF, EPSG:2154, 0.2 m
    DIR/flair_labels_train/D081_2020/Z1_NN/msk/MSK_000001.tif     1-band uint8 GeoTIFF, values 1..19
    DIR/flair_sen_train/D081_2020/Z1_NN/sen/SEN2_sp_D081_2020-Z1_NN_{data.npy,masks.npy,products.txt}
    DIR/flair_2_{aerial,labels,sen}_test/...                      held-out zones of the same domains
    DIR/flair-2_centroids_sp_to_patch.json, DIR/flair_aerial_metadata.json
    DIR/damformer_synth.json                                      generation options and ground truth

Output is deterministic for a seed (each zone draws from its own seeded generator) and written to a
temporary folder renamed into place at the end, so an interrupted run never leaves a half dataset.
The second date of every zone is fully overcast (recorded in ``damformer_synth.json``), which tests use.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

from damformer.errors import OutputExistsError
from damformer.miniature import scene
from damformer.progress import progress

log = logging.getLogger(__name__)

SOUTH_DOMAINS = ("D081_2020", "D032_2019", "D031_2019", "D046_2019", "D034_2021")
NORTH_DOMAINS = ("D080_2021", "D060_2021", "D008_2019", "D051_2019", "D077_2021")
ZONE_CODES = ("NN", "UA", "AU", "NU", "UU", "AN")
OVERCAST_DATE_INDEX = 1
INFO_FILE = "damformer_synth.json"
_CRS = "EPSG:2154"
_FOLDERS = {
    "train": ("flair_aerial_train", "flair_labels_train", "flair_sen_train"),
    "test": ("flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test"),
}
# Lambert-93 boxes (x min, x max, y min, y max) where the domains of each region are placed.
_REGION_BOXES = {
    "south": (700_000, 1_000_000, 6_200_000, 6_350_000),
    "north": (600_000, 750_000, 6_900_000, 7_050_000),
}


@dataclass(frozen=True)
class SynthOptions:
    """Size and content of the miniature dataset.

    Attributes:
        seed: the whole dataset is a function of this seed.
        patch_size: aerial side in pixels (FLAIR-2: 512; 256 keeps the demo fast).
        domains_per_region: how many of the 5 south and 5 north DAM-Former domains to write.
        zones_per_domain: zones of the train split per domain.
        test_zones_per_domain: zones of the test split per domain (held-out zones, same domains).
        patches_per_zone: aerial patches per zone.
        min_dates, max_dates: range of the number of Sentinel-2 acquisitions per zone.
        crop_size: the Sentinel-2 crop the superpatches must accommodate around every centroid.
    """

    seed: int = 0
    patch_size: int = 256
    domains_per_region: int = 2
    zones_per_domain: int = 2
    test_zones_per_domain: int = 1
    patches_per_zone: int = 6
    min_dates: int = 14
    max_dates: int = 26
    crop_size: int = 40

    def __post_init__(self) -> None:
        checks = {
            "patch_size": (self.patch_size >= 32 and self.patch_size % 32 == 0, "a multiple of 32, >= 32"),
            "domains_per_region": (1 <= self.domains_per_region <= 5, "1..5"),
            "zones_per_domain": (1 <= self.zones_per_domain <= 20, "1..20"),
            "test_zones_per_domain": (0 <= self.test_zones_per_domain <= 20, "0..20"),
            "patches_per_zone": (1 <= self.patches_per_zone <= 100, "1..100"),
            "min_dates": (3 <= self.min_dates <= self.max_dates, "3..max_dates"),
            "max_dates": (self.max_dates <= 120, "<= 120"),
            "crop_size": (self.crop_size >= 8 and self.crop_size % 2 == 0, "an even number >= 8"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{name}: expected {expected}, found {getattr(self, name)}")


@dataclass(frozen=True)
class _ZoneJob:
    split: str
    region: str
    domain: str
    domain_index: int
    zone: str
    zone_index: int
    first_patch: int


def _zone_jobs(options: SynthOptions) -> list[_ZoneJob]:
    jobs = []
    next_patch = 1
    domains = [("south", d) for d in SOUTH_DOMAINS[: options.domains_per_region]]
    domains += [("north", d) for d in NORTH_DOMAINS[: options.domains_per_region]]
    zone_counts = {"train": options.zones_per_domain, "test": options.test_zones_per_domain}
    for split in ("train", "test"):
        for domain_index, (region, domain) in enumerate(domains):
            offset = 0 if split == "train" else options.zones_per_domain
            for k in range(zone_counts[split]):
                zone_index = offset + k
                zone = f"Z{zone_index + 1}_{ZONE_CODES[zone_index % len(ZONE_CODES)]}"
                jobs.append(_ZoneJob(split, region, domain, domain_index, zone, zone_index, next_patch))
                next_patch += options.patches_per_zone
    return jobs


def _domain_frame(options: SynthOptions, job: _ZoneJob) -> tuple[float, float, np.ndarray]:
    """Lambert-93 origin of a domain and its radiometric jitter (shared by its train and test zones)."""
    rng = np.random.default_rng([options.seed, 7919, job.domain_index])
    x_min, x_max, y_min, y_max = _REGION_BOXES[job.region]
    x0 = float(rng.integers(x_min // 1000, x_max // 1000)) * 1000.0
    y0 = float(rng.integers(y_min // 1000, y_max // 1000)) * 1000.0
    jitter = np.concatenate([rng.normal(0.0, 0.03, 4), rng.normal(0.0, 0.15, 4), rng.choice([-1.0, 1.0], 1)])
    return x0, y0, jitter


def _acquisition_dates(rng: np.random.Generator, year: int, count: int) -> list[dt.date]:
    days_in_year = 366 if year % 4 == 0 else 365
    days = np.sort(rng.choice(days_in_year, size=count, replace=False))
    return [dt.date(year, 1, 1) + dt.timedelta(days=int(d)) for d in days]


def _product_name(rng: np.random.Generator, date: dt.date, tile: str) -> str:
    platform = "S2A" if rng.random() < 0.5 else "S2B"
    sensing = f"{date:%Y%m%d}T{int(rng.integers(100000, 115959)):06d}"
    processed = f"{date:%Y%m%d}T{int(rng.integers(120000, 145959)):06d}"
    baseline, orbit = int(rng.integers(209, 500)), int(rng.integers(1, 143))
    return f"{platform}_MSIL2A_{sensing}_N0{baseline}_R{orbit:03d}_{tile}_{processed}"


def _masks_for_date(rng: np.random.Generator, shape: tuple[int, int], kind: str, snowy: bool) -> np.ndarray:
    """(2, H, W) uint8 snow and cloud probabilities for one date of the given kind."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    cloud = rng.uniform(0, 12, size=shape)
    if kind == "overcast":
        cloud = rng.uniform(80, 100, size=shape)
    elif kind == "partial":
        for _ in range(int(rng.integers(1, 4))):
            r, c = rng.uniform(0, height), rng.uniform(0, width)
            sigma = rng.uniform(4, 14)
            cloud = np.maximum(cloud, 100 * np.exp(-0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / sigma**2))
    snow = np.zeros(shape)
    if snowy:
        r, c, sigma = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 25)
        snow = 100 * np.exp(-0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / sigma**2)
    return np.clip(np.rint(np.stack([snow, cloud])), 0, 100).astype(np.uint8)


def _superpatch(
    rng: np.random.Generator,
    job: _ZoneJob,
    shape: tuple[int, int],
    seeds: scene.RegionSeeds,
    dates: list[dt.date],
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The zone's Sentinel-2 data (T, 10, H, W) and masks (T, 2, H, W), and its overcast date indices."""
    shift = scene.REGION_SHIFTS[job.region]
    fractions = scene.class_fractions(seeds, *shape)
    data = np.empty((len(dates), 10, *shape), dtype=np.float64)
    masks = np.empty((len(dates), 2, *shape), dtype=np.uint8)
    overcast = []
    for t, date in enumerate(dates):
        kind = (
            "overcast"
            if t == OVERCAST_DATE_INDEX
            else str(rng.choice(["clear", "partial", "overcast"], p=[0.6, 0.28, 0.12]))
        )
        if kind == "overcast":
            overcast.append(t)
        snowy = job.region == "north" and date.month in (12, 1, 2) and rng.random() < 0.5
        masks[t] = _masks_for_date(rng, shape, kind, snowy)
        clear = np.einsum("cb,chw->bhw", scene.class_signatures(date.timetuple().tm_yday, shift), fractions)
        clear += rng.normal(0.0, 60.0, size=clear.shape)
        snow_alpha = np.clip(masks[t, 0] / 100.0, 0, 1)[None]
        cloud_alpha = np.clip((masks[t, 1] - 20.0) / 80.0, 0, 1)[None] * 0.95
        mixed = clear * (1 - snow_alpha) + scene.S2_SNOW[:, None, None] * snow_alpha
        data[t] = mixed * (1 - cloud_alpha) + scene.S2_CLOUD[:, None, None] * cloud_alpha
    return data, masks, overcast


def _write_geotiff(path: Path, array: np.ndarray, transform: Affine) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=array.shape[2],
        height=array.shape[1],
        count=array.shape[0],
        dtype="uint8",
        crs=_CRS,
        transform=transform,
    ) as dst:
        dst.write(array)


def _write_zone(root: Path, options: SynthOptions, job: _ZoneJob) -> Iterator[tuple[str, dict[str, Any]]]:
    """Write one zone (superpatch and its patches); yield (patch file name, record) per patch."""
    rng = np.random.default_rng(
        [options.seed, 0 if job.split == "train" else 1, job.domain_index, job.zone_index]
    )
    size = options.patch_size
    year = int(job.domain.split("_")[1])
    half = options.crop_size // 2
    spacing = math.ceil(size * scene.AERIAL_M / scene.CELL_M) + 1  # footprints never overlap
    side = math.ceil(math.sqrt(options.patches_per_zone))
    height = options.crop_size + (side - 1) * spacing + int(rng.integers(0, 8))
    width = (
        options.crop_size + (side - 1) * spacing + int(rng.integers(0, 14))
    )  # superpatches need not be square
    seeds = scene.jittered_seeds(rng, height, width, job.region)
    dates = _acquisition_dates(rng, year, int(rng.integers(options.min_dates, options.max_dates + 1)))
    data, masks, overcast = _superpatch(rng, job, (height, width), seeds, dates)
    dtype = np.int16 if job.zone_index % 2 == 0 else np.uint16  # the format allows both
    aerial_dir, labels_dir, sen_dir = (root / name / job.domain / job.zone for name in _FOLDERS[job.split])
    sen = sen_dir / "sen"
    sen.mkdir(parents=True, exist_ok=True)
    stem = f"SEN2_sp_{job.domain}-{job.zone}"
    np.save(sen / f"{stem}_data.npy", np.clip(np.rint(data), 0, 10000).astype(dtype))
    np.save(sen / f"{stem}_masks.npy", masks)
    tile = "T31TFJ" if job.region == "south" else "T31UDQ"
    (sen / f"{stem}_products.txt").write_text("".join(_product_name(rng, d, tile) + "\n" for d in dates))

    x0, y0, jitter = _domain_frame(options, job)
    zone_x = x0 + 3000.0 * job.zone_index  # superpatch top-left corner, Lambert-93
    zone_y = y0 - 1500.0 * job.zone_index
    positions = [(half + i * spacing, half + j * spacing) for i in range(side) for j in range(side)]
    picks = sorted(rng.choice(len(positions), size=options.patches_per_zone, replace=False))
    shift = scene.REGION_SHIFTS[job.region]
    pixel_cells = scene.AERIAL_M / scene.CELL_M
    for k, pick in enumerate(picks):
        row, col = positions[pick]
        number = job.first_patch + k
        # Aerial pixel (i, j) centre in S2-cell units: the centroid lies on a cell corner, so the
        # baseline's [row-20:row+20] crop is centred on the footprint exactly.
        axis = (np.arange(size) + 0.5) * pixel_cells - size * pixel_cells / 2
        points = np.stack(np.meshgrid(row + axis, col + axis, indexing="ij"), axis=-1)
        warp = np.stack([scene.smooth_noise(rng, size, 6), scene.smooth_noise(rng, size, 6)], axis=-1) * 0.25
        region_map = scene.nearest_region(points + warp, seeds)
        raw = scene.render_raw_labels(rng, region_map, job.region)
        aerial = scene.render_aerial(rng, raw, shift, jitter)
        centre_x, centre_y = zone_x + col * scene.CELL_M, zone_y - row * scene.CELL_M
        half_m = size * scene.AERIAL_M / 2
        transform = Affine(scene.AERIAL_M, 0.0, centre_x - half_m, 0.0, -scene.AERIAL_M, centre_y + half_m)
        digits = f"{number:06d}"
        _write_geotiff(aerial_dir / "img" / f"IMG_{digits}.tif", aerial, transform)
        _write_geotiff(labels_dir / "msk" / f"MSK_{digits}.tif", raw[None], transform)
        flight = dt.date(year, 5, 1) + dt.timedelta(days=int(rng.integers(0, 120)))
        yield (
            f"IMG_{digits}",
            {
                "centroid": [int(row), int(col)],
                "metadata": {
                    "domain": job.domain,
                    "zone": job.zone,
                    "patch_centroid_x": round(centre_x, 2),
                    "patch_centroid_y": round(centre_y, 2),
                    "patch_centroid_z": round(float(rng.uniform(20, 400)), 2),
                    "camera": str(rng.choice(["UCE-M3-f100-s06", "UCE-M3-f120-s06", "UCE-M3-f100"])),
                    "date": flight.isoformat(),
                    "time": f"{int(rng.integers(9, 16)):02d}h{int(rng.integers(0, 60)):02d}",
                },
                "overcast_dates": [dates[t].isoformat() for t in overcast],
            },
        )


def generate(
    out: Path | str, options: SynthOptions | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write the miniature FLAIR-2 to ``out`` (atomically) and return a summary.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    options = options or SynthOptions()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    centroids: dict[str, list[int]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    overcast: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    try:
        jobs = _zone_jobs(options)
        for job in progress(jobs, desc="synth zones", unit="zone"):
            for patch_id, record in _write_zone(tmp, options, job):
                centroids[f"{patch_id}.tif"] = record["centroid"]
                metadata[patch_id] = record["metadata"]
                overcast[f"{job.domain}-{job.zone}"] = record["overcast_dates"]
                counts[f"{job.split}/{job.region}"] = counts.get(f"{job.split}/{job.region}", 0) + 1
        (tmp / "flair-2_centroids_sp_to_patch.json").write_text(json.dumps(centroids, indent=1))
        (tmp / "flair_aerial_metadata.json").write_text(json.dumps(metadata, indent=1))
        info = {
            "generator": "damformer synth",
            "options": asdict(options),
            "regions": {
                "south": list(SOUTH_DOMAINS[: options.domains_per_region]),
                "north": list(NORTH_DOMAINS[: options.domains_per_region]),
            },
            "patches": counts,
            "overcast_dates": overcast,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    log.info("wrote %d patches to %s", len(centroids), out)
    return info


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is only deleted once ``new`` is in place."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
