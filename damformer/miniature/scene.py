"""Scene model of the miniature FLAIR-2: land cover, aerial appearance, Sentinel-2 phenology, domain shift.

The point of the miniature dataset is to be *learnable* and *domain-shifted* in the ways that matter to
DAM-Former, not to be pretty:

- most classes have their own aerial colour / NIR / elevation and texture (stripes for vineyards,
  canopy blobs for forests, rectangles of roofs in urban fabric), and every class its own Sentinel-2
  phenology (vegetation fraction over the year mixing soil, vegetation, urban or water spectra), so
  both branches carry signal;
- three *twin* pairs (``TWINS``) look the same in the single summer aerial image but not over the
  year, as in FLAIR-2 where they are the typical confusions: herbaceous vegetation vs agricultural
  land, coniferous vs deciduous, bare soil vs plowed land. Only the Sentinel-2 time series tells them
  apart, which is what DAM-Former's temporal branch is for;
- the aerial map and the Sentinel-2 superpatch are drawn from the same zone-level land cover, so the
  two sensors agree where the aerial footprint lies;
- a region (``south`` or ``north``) sets class priors, an aerial radiometric shift (per-band gain and
  offset, less NIR for northern vegetation) and a Sentinel-2 phenology delay: a model trained on the
  south loses accuracy in the north, while the structure it learned still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from damformer.data.sentinel import S2_PIXEL_M

CELL_M = S2_PIXEL_M  # one scene cell = one Sentinel-2 pixel
AERIAL_M = 0.2  # aerial pixel
REGION_BLOCK_CELLS = 3.5  # one land-cover region seed per block of this many S2 cells (35 m)

NOISE_SCALE = 1.4  # per-pixel noise multiplier: classes overlap pixel-wise, texture and context separate them
URBAN = 1  # region code 1 renders as urban fabric: roofs (1), streets (3), gardens (2), pools (13)

# Region priors by raw FLAIR class value. "building" means urban fabric (see URBAN).
REGION_PRIORS: dict[str, dict[int, float]] = {
    "south": {
        1: 0.14,
        2: 0.05,
        3: 0.06,
        4: 0.06,
        5: 0.04,
        6: 0.09,
        7: 0.09,
        8: 0.13,
        9: 0.11,
        10: 0.10,
        11: 0.06,
        12: 0.03,
        15: 0.01,
        16: 0.01,
        17: 0.01,
        18: 0.01,
    },
    "north": {
        1: 0.12,
        2: 0.06,
        3: 0.06,
        4: 0.02,
        5: 0.05,
        6: 0.03,
        7: 0.18,
        8: 0.04,
        9: 0.02,
        10: 0.16,
        11: 0.14,
        12: 0.08,
        15: 0.01,
        16: 0.01,
        17: 0.01,
        19: 0.01,
    },
}


@dataclass(frozen=True)
class AerialLook:
    """Appearance of a raw class in the aerial patch (0..255 scale)."""

    rgbn: tuple[float, float, float, float]
    height: float  # elevation band value (normalised surface model)
    noise: float  # per-pixel noise std
    texture: str = "none"  # none | canopy | stripes
    stripe_period: float = 0.0  # pixels
    stripe_rgbn: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # added on alternate stripes


# Twin pairs (raw codes): one aerial look each, different phenology (see the module docstring).
TWINS: tuple[tuple[int, int], ...] = ((10, 11), (6, 7), (4, 12))
_FIELD = AerialLook((100, 148, 80, 172), 1, 7)  # herbaceous vegetation and agricultural land in summer
_FOREST = AerialLook((56, 88, 58, 150), 62, 10, "canopy")  # coniferous and deciduous canopies
_SOIL = AerialLook((152, 126, 100, 114), 0, 7)  # bare soil and plowed land

AERIAL_LOOKS: dict[int, AerialLook] = {
    1: AerialLook((158, 138, 130, 112), 45, 6),
    2: AerialLook((112, 132, 92, 150), 2, 8),
    3: AerialLook((118, 118, 122, 88), 0, 5),
    4: _SOIL,
    5: AerialLook((42, 62, 84, 22), 0, 3),
    6: _FOREST,
    7: _FOREST,
    8: AerialLook((102, 114, 78, 146), 10, 12, "canopy"),
    9: AerialLook((136, 126, 96, 128), 5, 6, "stripes", 12, (-55, -25, -35, 45)),
    10: _FIELD,
    11: _FIELD,
    12: _SOIL,
    13: AerialLook((66, 168, 204, 38), 0, 4),
    14: AerialLook((238, 240, 246, 205), 0, 3),
    15: AerialLook((122, 110, 84, 118), 3, 14),
    16: AerialLook((74, 96, 64, 156), 40, 10, "canopy"),
    17: AerialLook((112, 104, 74, 138), 15, 10, "canopy"),
    18: AerialLook((204, 208, 214, 168), 15, 4),
    19: AerialLook((122, 120, 110, 108), 2, 10),
}

# Sentinel-2 end-members, reflectance x 10000, bands B2 B3 B4 B5 B6 B7 B8 B8A B11 B12.
S2_VEGETATION = np.array([300, 600, 350, 1000, 2600, 3200, 3500, 3600, 1800, 900], dtype=np.float64)
S2_SOIL = np.array([900, 1200, 1500, 1800, 2000, 2200, 2400, 2500, 3000, 2500], dtype=np.float64)
S2_URBAN = np.array([1100, 1200, 1300, 1400, 1500, 1600, 1700, 1750, 2200, 2000], dtype=np.float64)
S2_WATER = np.array([600, 500, 300, 200, 150, 120, 100, 90, 50, 40], dtype=np.float64)
S2_CLOUD = np.array([5200, 5100, 5000, 5000, 5100, 5100, 5200, 5200, 3800, 2800], dtype=np.float64)
S2_SNOW = np.array([8800, 8600, 8400, 8200, 8000, 7800, 7600, 7500, 900, 700], dtype=np.float64)


@dataclass(frozen=True)
class Phenology:
    """Vegetation fraction over the year: ``base + amplitude * bump(day; peak, width)`` over a background."""

    background: str  # soil | urban | water
    base: float
    amplitude: float = 0.0
    peak_day: float = 180.0
    width_days: float = 60.0


PHENOLOGY: dict[int, Phenology] = {
    1: Phenology("urban", 0.12, 0.08, 160, 70),  # urban fabric: roofs, streets and some gardens
    2: Phenology("soil", 0.35, 0.25, 130, 60),
    3: Phenology("urban", 0.03),
    4: Phenology("soil", 0.03),
    5: Phenology("water", 0.0),
    6: Phenology("soil", 0.72, 0.10, 190, 90),
    7: Phenology("soil", 0.15, 0.75, 195, 65),
    8: Phenology("soil", 0.40, 0.25, 150, 70),
    9: Phenology("soil", 0.18, 0.50, 210, 45),
    10: Phenology("soil", 0.35, 0.45, 140, 55),
    11: Phenology("soil", 0.05, 0.85, 165, 32),
    12: Phenology("soil", 0.12, 0.38, 105, 55),  # crop residue, a spring crop ploughed in by the flight
    13: Phenology("water", 0.0),
    14: Phenology("soil", 0.0),
    15: Phenology("soil", 0.15, 0.20, 170, 60),
    16: Phenology("soil", 0.45, 0.40, 190, 70),
    17: Phenology("soil", 0.40, 0.30, 180, 70),
    18: Phenology("urban", 0.10),
    19: Phenology("soil", 0.20, 0.20, 170, 60),
}
_BACKGROUNDS = {"soil": S2_SOIL, "urban": S2_URBAN, "water": S2_WATER}
RAW_CODES = np.arange(1, 20)


@dataclass(frozen=True)
class RegionShift:
    """How a region's imagery departs from the reference (south) appearance."""

    aerial_gain: tuple[float, float, float, float]
    aerial_offset: tuple[float, float, float, float]
    vegetation_nir: float  # extra NIR factor on vegetated aerial pixels (season of the flight)
    phenology_delay_days: float
    s2_gain: float


REGION_SHIFTS: dict[str, RegionShift] = {
    "south": RegionShift((1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0), 1.0, 0.0, 1.0),
    "north": RegionShift((0.80, 0.83, 0.88, 0.92), (12.0, 12.0, 16.0, 2.0), 0.97, 28.0, 0.92),
}


@dataclass(frozen=True)
class RegionSeeds:
    """Land-cover region seeds of a zone on a jittered grid (one seed per block of REGION_BLOCK_CELLS).

    Attributes:
        positions: (R, C, 2) seed positions in S2-cell units (row, col); block (0, 0) starts at -1 block.
        classes: (R, C) raw class code of each seed's region.
    """

    positions: np.ndarray
    classes: np.ndarray


def jittered_seeds(rng: np.random.Generator, height: int, width: int, region: str) -> RegionSeeds:
    """Draw a zone's region seeds: a jittered grid covering the superpatch plus one block of margin."""
    rows = np.arange(-1, int(np.ceil(height / REGION_BLOCK_CELLS)) + 1)
    cols = np.arange(-1, int(np.ceil(width / REGION_BLOCK_CELLS)) + 1)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).astype(np.float64)
    positions = (grid + rng.uniform(0.0, 1.0, size=grid.shape)) * REGION_BLOCK_CELLS
    priors = REGION_PRIORS[region]
    codes = np.array(list(priors), dtype=np.int64)
    weights = np.array(list(priors.values()), dtype=np.float64)
    classes = rng.choice(codes, size=grid.shape[:2], p=weights / weights.sum())
    return RegionSeeds(positions, classes)


def nearest_region(points: np.ndarray, seeds: RegionSeeds) -> np.ndarray:
    """Class of the nearest seed for each point (..., 2) given in S2-cell units.

    On a jittered grid the nearest seed always lies within two blocks of the point's own block, so each
    chunk of points is compared only with the seeds of its bounding box plus two blocks: exact, and fast
    because a patch's points span only a few blocks.
    """
    flat = points.reshape(-1, 2)
    num_rows, num_cols = seeds.classes.shape
    result = np.empty(len(flat), dtype=np.int64)
    chunk_size = 16384
    for start in range(0, len(flat), chunk_size):
        chunk = flat[start : start + chunk_size]
        lo = (
            np.floor(chunk.min(axis=0) / REGION_BLOCK_CELLS).astype(int) + 1 - 2
        )  # +1: grid starts one block early
        hi = np.floor(chunk.max(axis=0) / REGION_BLOCK_CELLS).astype(int) + 1 + 2
        r0, c0 = max(lo[0], 0), max(lo[1], 0)
        r1, c1 = min(hi[0], num_rows - 1) + 1, min(hi[1], num_cols - 1) + 1
        candidates = seeds.positions[r0:r1, c0:c1].reshape(-1, 2)
        candidate_classes = seeds.classes[r0:r1, c0:c1].reshape(-1)
        distance = (chunk[:, 0, None] - candidates[None, :, 0]) ** 2 + (
            chunk[:, 1, None] - candidates[None, :, 1]
        ) ** 2
        result[start : start + chunk_size] = candidate_classes[np.argmin(distance, axis=1)]
    return result.reshape(points.shape[:-1])


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth noise in about [-1, 1]: a (cells+1)^2 random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    axis = np.linspace(0, cells, size)
    low = np.minimum(axis.astype(int), cells - 1)
    frac = axis - low
    rows = coarse[low] * (1 - frac)[:, None] + coarse[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]


def _rectangles(rng: np.random.Generator, size: int, count: int, side: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(count):
        h, w = rng.integers(side[0], side[1] + 1, size=2)
        r, c = rng.integers(-h // 2, size, size=2)
        mask[max(r, 0) : r + h, max(c, 0) : c + w] = True
    return mask


def render_raw_labels(rng: np.random.Generator, region_map: np.ndarray, region: str) -> np.ndarray:
    """Turn a patch's region map (raw class codes) into a raw label map with urban detail and roads."""
    size = region_map.shape[0]
    scale = size / 256.0
    labels = region_map.astype(np.uint8).copy()
    urban = region_map == URBAN
    if urban.any():
        labels[urban] = 3  # streets and yards
        gardens = _rectangles(rng, size, int(10 * scale**2), (int(30 * scale), int(70 * scale)))
        labels[urban & gardens] = 2
        roofs = _rectangles(rng, size, int(14 * scale**2), (int(22 * scale), int(55 * scale)))
        labels[urban & roofs] = 1
        pool_rate = 5 if region == "south" else 1
        pools = _rectangles(rng, size, int(pool_rate * scale**2), (int(8 * scale), int(16 * scale)))
        labels[urban & pools & ~roofs] = 13
    if rng.random() < 0.35:  # a road across the patch, over anything but water
        rows, cols = np.mgrid[0:size, 0:size]
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(0.2, 0.8) * size
        distance = np.abs(
            (rows - size / 2) * np.cos(angle) - (cols - size / 2) * np.sin(angle) + offset - size / 2
        )
        road = (distance < rng.uniform(5, 9) * scale) & (region_map != 5)
        labels[road] = 3
    return labels


def render_aerial(
    rng: np.random.Generator, raw_labels: np.ndarray, shift: RegionShift, domain_jitter: np.ndarray
) -> np.ndarray:
    """Render a (5, H, W) uint8 aerial patch (R, G, B, NIR, elevation) from raw labels."""
    size = raw_labels.shape[0]
    scale = size / 256.0
    image = np.zeros((5, size, size), dtype=np.float64)
    canopy = smooth_noise(rng, size, max(4, int(24 * scale)))
    angle = rng.uniform(0, np.pi)
    rows, cols = np.mgrid[0:size, 0:size]
    along = rows * np.cos(angle) + cols * np.sin(angle)
    vegetated = np.zeros((size, size), dtype=bool)
    for code in np.unique(raw_labels):
        look = AERIAL_LOOKS[int(code)]
        where = raw_labels == code
        values = np.array((*look.rgbn, look.height), dtype=np.float64)
        image[:, where] = values[:, None]
        if look.texture == "canopy":
            image[:4, where] += (canopy[where] * 18.0)[None, :]
            image[4, where] += canopy[where] * look.height * 0.25
        elif look.texture == "stripes":
            on = (np.floor(along[where] / look.stripe_period) % 2).astype(bool)
            image[:4, where] += np.array(look.stripe_rgbn)[:, None] * on[None, :]
        image[:4, where] += rng.normal(0.0, look.noise * NOISE_SCALE, size=(4, int(where.sum())))
        if PHENOLOGY[int(code)].base + PHENOLOGY[int(code)].amplitude > 0.5:
            vegetated |= where
    image[4] += rng.normal(0.0, 1.5, size=(size, size))
    image[3, vegetated] *= shift.vegetation_nir
    gain = np.array(shift.aerial_gain) * (1.0 + domain_jitter[:4])
    offset = np.array(shift.aerial_offset) + 20.0 * domain_jitter[4:8]
    illumination = 1.0 + 0.05 * (cols / size - 0.5) * np.sign(domain_jitter[8])
    image[:4] = (image[:4] * gain[:, None, None] + offset[:, None, None]) * illumination[None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def vegetation_fraction(day_of_year: float, pheno: Phenology, delay_days: float) -> float:
    """Vegetation fraction of a class on a day of the year, after a regional phenology delay."""
    distance = (day_of_year - pheno.peak_day - delay_days + 182.5) % 365.0 - 182.5
    return float(
        np.clip(pheno.base + pheno.amplitude * np.exp(-0.5 * (distance / pheno.width_days) ** 2), 0, 1)
    )


def class_signatures(day_of_year: float, shift: RegionShift) -> np.ndarray:
    """(19, 10) S2 reflectance of each raw class on a day of the year."""
    rows = []
    for code in RAW_CODES:
        pheno = PHENOLOGY[int(code)]
        veg = vegetation_fraction(day_of_year, pheno, shift.phenology_delay_days)
        rows.append(_BACKGROUNDS[pheno.background] * (1.0 - veg) + S2_VEGETATION * veg)
    return np.stack(rows) * shift.s2_gain


def class_fractions(seeds: RegionSeeds, height: int, width: int) -> np.ndarray:
    """(19, H, W) fraction of each raw class inside each S2 cell, from 5 x 5 sub-samples per cell."""
    sub = (np.arange(5) + 0.5) / 5.0
    rows = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)
    cols = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)
    points = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
    classes = nearest_region(points, seeds).reshape(height, 5, width, 5)
    fractions = np.stack([(classes == code).mean(axis=(1, 3)) for code in RAW_CODES])
    return fractions
