"""Training samples (numpy dicts) and the geometric augmentation applied to both sensors alike.

The aerial patch and its Sentinel-2 crop are centred on the same point (the crop is centred on the
patch centroid), so flipping or rotating each about its own centre keeps them aligned: every transform
is applied identically to the aerial bands, the label and every Sentinel-2 date.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from damformer.data.flair2 import Flair2Sample

SPATIAL_KEYS = ("aerial", "label", "s2")


def training_sample(sample: Flair2Sample) -> dict[str, Any]:
    """The part of a reader sample that training consumes, as a dict of numpy arrays and ids.

    Keys: ``key`` (patch id), ``domain``, ``aerial`` (5, H, W) uint8, ``label`` (H, W) uint8 or None,
    ``s2`` (T, 10, S, S) float32 or None, ``s2_day_offsets`` (T,) int32 or None, ``valid`` True.
    """
    return {
        "key": sample.patch_id,
        "domain": sample.domain,
        "aerial": sample.aerial,
        "label": sample.label,
        "s2": sample.s2,
        "s2_day_offsets": sample.s2_day_offsets,
        "valid": True,
    }


@dataclass(frozen=True)
class GeometricAugment:
    """Random horizontal/vertical flips and a random multiple of 90 degrees, one draw per sample.

    Attributes:
        hflip, vflip: probability of each flip.
        rot90: probability of rotating by a uniformly chosen 90, 180 or 270 degrees.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Return the transformed sample.

        Its arrays are strided views of the input's: no copy here, :func:`collate_samples` copies each
        array once, into the batch.
        """
        do_h, do_v, do_r = rng.random(3) < (self.hflip, self.vflip, self.rot90)
        turns = int(rng.integers(1, 4)) if do_r else 0
        out = dict(sample)
        for key in SPATIAL_KEYS:
            array = sample[key]
            if array is None:
                continue
            if do_h:
                array = array[..., :, ::-1]
            if do_v:
                array = array[..., ::-1, :]
            if turns:
                array = np.rot90(array, k=turns, axes=(-2, -1))
            out[key] = array
        return out
