"""Read every patch of a FLAIR-2 selection and summarise it (the ``damformer read`` command)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from damformer.data.classes import FLAIR_CLASSES, NUM_CLASSES
from damformer.data.flair2 import NUM_AERIAL_BANDS, Flair2Dataset
from damformer.progress import progress


@dataclass
class DomainSummary:
    """Totals of one domain over its patches."""

    domain: str
    zones: set[str] = field(default_factory=set)
    patches: int = 0
    pixels: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, dtype=np.int64))
    band_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_AERIAL_BANDS, dtype=np.float64))
    s2_acquisitions: int = 0
    s2_clear: int = 0
    s2_steps: int = 0


def summarize(dataset: Flair2Dataset) -> list[DomainSummary]:
    """Read every sample (this validates each file) and accumulate per-domain statistics."""
    by_domain: dict[str, DomainSummary] = defaultdict(lambda: DomainSummary(""))
    for sample in progress(
        (dataset[i] for i in range(len(dataset))), desc="read patches", unit="patch", total=len(dataset)
    ):
        summary = by_domain[sample.domain]
        summary.domain = sample.domain
        summary.zones.add(sample.zone)
        summary.patches += 1
        summary.pixels += sample.aerial.shape[1] * sample.aerial.shape[2]
        summary.band_sum += sample.aerial.reshape(NUM_AERIAL_BANDS, -1).sum(axis=1, dtype=np.float64)
        if sample.label is not None:
            summary.class_pixels += np.bincount(sample.label.ravel(), minlength=NUM_CLASSES)
        if sample.s2 is not None:
            summary.s2_acquisitions += sample.s2_num_acquisitions
            summary.s2_clear += sample.s2_num_clear
            summary.s2_steps += sample.s2.shape[0]
    return [by_domain[d] for d in sorted(by_domain)]


def format_summary(summaries: list[DomainSummary]) -> str:
    """Two plain-text tables: per-domain counts and band means, then class shares (%) per domain."""
    lines = [
        f"{'domain':<10} {'zones':>5} {'patches':>7} {'S2 acq':>7} {'clear':>6} {'steps':>6}"
        f" {'R':>6} {'G':>6} {'B':>6} {'NIR':>6} {'elev':>6}",
    ]
    for s in summaries:
        n = max(s.patches, 1)
        means = s.band_sum / max(s.pixels, 1)
        lines.append(
            f"{s.domain:<10} {len(s.zones):>5} {s.patches:>7} "
            f"{s.s2_acquisitions / n:>7.1f} {s.s2_clear / n:>6.1f}"
            f" {s.s2_steps / n:>6.1f} " + " ".join(f"{m:>6.1f}" for m in means)
        )
    lines.append(
        "(S2 columns are per patch: acquisitions in the zone, clear after filtering, time steps used)"
    )
    if any(s.class_pixels.sum() for s in summaries):
        lines.append("")
        lines.append(f"{'class share %':<22}" + "".join(f" {s.domain:>10}" for s in summaries))
        for cls in FLAIR_CLASSES:
            shares = [100.0 * s.class_pixels[cls.index] / max(s.class_pixels.sum(), 1) for s in summaries]
            lines.append(f"{cls.name:<22}" + "".join(f" {share:>10.1f}" for share in shares))
    return "\n".join(lines)
