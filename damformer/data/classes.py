"""FLAIR-2 land-cover classes: the 19 raw values and the 13-class setting DAM-Former trains on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RAW_CLASS_NAMES: tuple[str, ...] = (
    "building",
    "pervious surface",
    "impervious surface",
    "bare soil",
    "water",
    "coniferous",
    "deciduous",
    "brushwood",
    "vineyard",
    "herbaceous vegetation",
    "agricultural land",
    "plowed land",
    "swimming pool",
    "snow",
    "clear cut",
    "mixed",
    "ligneous",
    "greenhouse",
    "other",
)
"""Names of raw label values 1..19 (index 0 is value 1)."""

NUM_RAW_CLASSES = 19
NUM_CLASSES = 13
OTHER_CLASS = 12
"""Index of "other" in the 13-class setting: swimming pool and raw classes 14..19 merged."""


@dataclass(frozen=True)
class LandCoverClass:
    """One class of the 13-class setting, with the colour used in maps and quicklooks."""

    index: int
    name: str
    rgb: tuple[int, int, int]


FLAIR_CLASSES: tuple[LandCoverClass, ...] = (
    LandCoverClass(0, "building", (219, 14, 154)),
    LandCoverClass(1, "pervious surface", (147, 142, 123)),
    LandCoverClass(2, "impervious surface", (248, 12, 0)),
    LandCoverClass(3, "bare soil", (169, 113, 1)),
    LandCoverClass(4, "water", (21, 83, 174)),
    LandCoverClass(5, "coniferous", (25, 74, 38)),
    LandCoverClass(6, "deciduous", (70, 228, 131)),
    LandCoverClass(7, "brushwood", (243, 166, 13)),
    LandCoverClass(8, "vineyard", (102, 0, 130)),
    LandCoverClass(9, "herbaceous vegetation", (85, 255, 0)),
    LandCoverClass(10, "agricultural land", (255, 243, 13)),
    LandCoverClass(11, "plowed land", (228, 223, 124)),
    LandCoverClass(12, "other", (0, 0, 0)),
)

# Lookup table raw value -> 13-class index; 255 marks values that are not valid FLAIR-2 labels.
_REMAP_LUT = np.full(256, 255, dtype=np.uint8)
_REMAP_LUT[1 : NUM_RAW_CLASSES + 1] = np.minimum(np.arange(1, NUM_RAW_CLASSES + 1), 13) - 1


def invalid_raw_values(raw: np.ndarray) -> list[int]:
    """Return the sorted distinct values of ``raw`` (uint8) that are outside 1..19."""
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    return [int(v) for v in present if not 1 <= v <= NUM_RAW_CLASSES]


def remap_labels(raw: np.ndarray) -> np.ndarray:
    """Map raw FLAIR-2 labels 1..19 to the 13-class setting 0..12 (values > 13 become 13, minus 1).

    Args:
        raw: uint8 array of raw labels, any shape; every value must be in 1..19 (check with
            :func:`invalid_raw_values` first: this function does not validate).

    Returns:
        uint8 array of the same shape with values 0..12.
    """
    return _REMAP_LUT[raw]
