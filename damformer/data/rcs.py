"""Rare class sampling (DAFormer): draw source samples so that rare classes are seen more often.

From the shard manifest's per-sample class pixel counts (computed once, while sharding):
``P(c) = softmax((1 - f_c) / T)`` over the classes present, ``f_c`` their pixel frequency and ``T``
the temperature (0.01); a sample for class ``c`` is drawn uniformly among the samples holding more
than ``min_pixels`` pixels of ``c``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# DAFormer's 3000 pixels, at 512 x 512: scale with the patch area.
REFERENCE_MIN_PIXELS = 3000
REFERENCE_AREA = 512 * 512


def class_probabilities(class_pixels: Sequence[int], *, temperature: float = 0.01) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T) over classes with pixels; 0 for absent classes."""
    if temperature <= 0:
        raise ValueError(f"uda.rcs_temperature: expected > 0, found {temperature}")
    counts = np.asarray(class_pixels, dtype=np.float64)
    present = counts > 0
    freq = counts / counts.sum()
    logits = np.where(present, (1.0 - freq) / temperature, -np.inf)
    logits = logits - logits[present].max()
    weights = np.exp(logits)
    return weights / weights.sum()


class RareClassSampler:
    """Draw sample keys by rare class sampling.

    Args:
        samples: {key: per-class pixel counts} (the manifest's ``samples[key]["class_pixels"]``).
        temperature: RCS temperature.
        min_pixels: a sample serves class c when it holds more than this many pixels of c; None scales
            DAFormer's 3000 at 512 x 512 to the patches' area.
        seed: sampling seed (the draws are a function of (seed, index)).
    """

    def __init__(
        self,
        samples: Mapping[str, Sequence[int]],
        *,
        temperature: float = 0.01,
        min_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        if not samples:
            raise ValueError("rare class sampling: no labelled samples (a source shard set without labels?)")
        self.keys = sorted(samples)
        counts = np.asarray([samples[k] for k in self.keys], dtype=np.int64)  # (N, classes)
        if min_pixels is None:
            area = int(counts[0].sum())
            min_pixels = max(1, round(REFERENCE_MIN_PIXELS * area / REFERENCE_AREA))
        self.min_pixels = min_pixels
        self.candidates = {c: np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])}
        totals = np.where(
            [len(self.candidates[c]) > 0 for c in range(counts.shape[1])], counts.sum(axis=0), 0
        )
        self.probabilities = class_probabilities(totals, temperature=temperature)
        self.seed = seed

    def draw(self, index: int) -> tuple[str, int]:
        """The ``index``-th draw: (sample key, the class it was drawn for)."""
        rng = np.random.default_rng([self.seed, index, 41])
        cls = int(rng.choice(len(self.probabilities), p=self.probabilities))
        candidates = self.candidates[cls]
        return self.keys[int(candidates[rng.integers(len(candidates))])], cls
