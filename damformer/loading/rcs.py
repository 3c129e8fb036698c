"""Rare class sampling (DAFormer): draw source samples so that rare classes are seen more often.

From the shard manifest's per-sample class pixel counts (computed once, while sharding):
``P(c) = softmax((1 - f_c) / T)`` over the classes present, ``f_c`` their pixel frequency and ``T``
the temperature (0.01); a sample for class ``c`` is drawn uniformly among the samples holding more
than ``min_pixels`` pixels of ``c``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

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
        self._warn_if_concentrated(temperature)

    def sample_shares(self) -> np.ndarray:
        """Expected share of the draws that falls on each sample (in ``keys`` order)."""
        shares = np.zeros(len(self.keys))
        for cls, candidates in self.candidates.items():
            if len(candidates) and self.probabilities[cls] > 0:
                shares[candidates] += self.probabilities[cls] / len(candidates)
        return shares

    def _warn_if_concentrated(self, temperature: float) -> None:
        # On a small source set a low temperature sends nearly every draw to the few samples holding
        # the rarest classes: the common classes are then hardly trained at all.
        shares = np.sort(self.sample_shares())[::-1]
        few = max(1, len(shares) // 5)
        if len(shares) >= 5 and shares[:few].sum() > 0.8:
            log.warning(
                "rare class sampling: %.0f%% of the draws fall on %d of %d source samples "
                "(uda.rcs_temperature %g); raise the temperature or set uda.rcs=false on so small a set",
                100 * shares[:few].sum(),
                few,
                len(shares),
                temperature,
            )

    def draw(self, index: int) -> tuple[str, int]:
        """The ``index``-th draw: (sample key, the class it was drawn for)."""
        rng = np.random.default_rng([self.seed, index, 41])
        cls = int(rng.choice(len(self.probabilities), p=self.probabilities))
        candidates = self.candidates[cls]
        return self.keys[int(candidates[rng.integers(len(candidates))])], cls
