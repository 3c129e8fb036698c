"""Paired comparisons of a study's rows: does A beat B, seed for seed?

Two rows trained with the same seeds share their initial weights, sample order and random draws, so
the difference of their scores seed by seed removes much of the seed-to-seed spread. For each pair
(row, baseline) over the seeds both finished, with d_i = score(row, seed i) - score(baseline, seed i):

* mean difference and paired standard deviation (n - 1) of the d_i, in percentage points;
* the exact two-sided sign-flip (paired permutation) p-value: under "no difference" each d_i is as
  likely to have either sign, so p is the share of the 2^n sign patterns whose |mean| is at least the
  observed one (the observed pattern included). With n seeds the smallest possible p is 2 / 2^n:
  3 seeds can never go below 0.25, 5 seeds below 0.0625.

Above ``EXACT_LIMIT`` seeds the 2^n patterns are sampled (``MONTE_CARLO_DRAWS`` draws, fixed seed).
The primary metric is mIoU over the 13 classes; the secondary ones are the twin-class mean, mIoU over
12 classes and accuracy, and mIoU 13 on the validation split where runs have one (recipe choices).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 20
MONTE_CARLO_DRAWS = 200_000
# Classes that look alike in an aerial image and differ in their Sentinel-2 year (the miniature's pairs
# coniferous/deciduous, herbaceous vegetation/agricultural land, bare soil/plowed land): what the
# temporal branch exists for.
TWIN_CLASSES = (5, 6, 9, 10, 3, 11)
METRICS = (
    ("miou13", "mIoU 13"),
    ("twin6", "twin-class mean"),
    ("miou12", "mIoU 12"),
    ("accuracy", "accuracy"),
    ("val_miou13", "val mIoU 13"),
)


def sign_flip_p_value(differences: list[float] | np.ndarray) -> float:
    """Two-sided p-value of the paired sign-flip test of ``mean(differences) == 0`` (exact up to 20)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan
    observed = abs(d.mean())
    tolerance = 1e-9 * max(1.0, float(np.abs(d).max()))
    if d.size <= EXACT_LIMIT:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    else:
        rng = np.random.default_rng(0)
        signs = rng.choice((1.0, -1.0), size=(MONTE_CARLO_DRAWS, d.size))
    means = np.abs(signs @ d) / d.size
    return float(np.mean(means >= observed - tolerance))


@dataclass(frozen=True)
class PairedResult:
    """One metric of one comparison over the shared seeds (differences in percentage points)."""

    row: str
    baseline: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean difference row - baseline."""
        return float(np.mean(self.differences)) if self.differences else math.nan

    @property
    def sd(self) -> float:
        """Paired (sample) standard deviation of the differences; NaN under two seeds."""
        return float(np.std(self.differences, ddof=1)) if len(self.differences) > 1 else math.nan

    @property
    def p_value(self) -> float:
        """Exact two-sided sign-flip p-value."""
        return sign_flip_p_value(list(self.differences))

    @property
    def wins(self) -> int:
        """Seeds where the row scored higher than the baseline."""
        return sum(d > 0 for d in self.differences)


def run_metric(scores: object, metric: str) -> float:
    """One run's value of ``metric`` in percent (``scores``: a :class:`damformer.study.results.RunScores`)."""
    if metric == "miou13":
        return 100 * scores.miou  # type: ignore[attr-defined]
    if metric == "miou12":
        return 100 * scores.miou_without_other  # type: ignore[attr-defined]
    if metric == "accuracy":
        return 100 * scores.accuracy  # type: ignore[attr-defined]
    if metric == "val_miou13":
        return 100 * scores.val_miou  # type: ignore[attr-defined]
    if metric == "twin6":
        values = [scores.iou[c] for c in TWIN_CLASSES]  # type: ignore[attr-defined]
        finite = [v for v in values if not math.isnan(v)]
        return 100 * float(np.mean(finite)) if finite else math.nan
    raise ValueError(f"unknown metric {metric!r}")


def compare_rows(row: str, baseline: str, by_seed: dict[str, dict[int, object]], metric: str) -> PairedResult:
    """``row`` against ``baseline`` on ``metric`` (``by_seed``: row name -> seed -> its scores)."""
    seeds = sorted(set(by_seed.get(row, {})) & set(by_seed.get(baseline, {})))
    pairs = [
        (seed, run_metric(by_seed[row][seed], metric) - run_metric(by_seed[baseline][seed], metric))
        for seed in seeds
    ]
    pairs = [(seed, d) for seed, d in pairs if not math.isnan(d)]
    return PairedResult(
        row, baseline, metric, tuple(s for s, _ in pairs), tuple(round(d, 10) for _, d in pairs)
    )


def format_p(p: float) -> str:
    """A p-value for a table: 3 decimals, or ``< 0.001``."""
    if math.isnan(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
