"""The manifest of a shard set: shards, checksums, per-sample class counts and dataset statistics.

``manifest.json`` sits next to the shards. It is what the loader plans epochs from (sample counts per
shard), what rare class sampling reads (per-sample class pixel counts), and what normalisation reads
(per-band mean/std computed while sharding). It is written last and atomically: a shard set without
a manifest is incomplete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from damformer.data.classes import NUM_CLASSES
from damformer.data.flair2 import AERIAL_BANDS, Flair2Sample
from damformer.data.sentinel import S2_BANDS
from damformer.shards.format import FORMAT_VERSION, ShardFormatError

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "damformer-shards"


@dataclass
class ShardStats:
    """Statistics of one shard, accumulated while writing it (stored in the shard's sidecar JSON)."""

    keys: list[str] = field(default_factory=list)
    class_pixels: dict[str, list[int]] = field(default_factory=dict)
    aerial_sum: list[float] = field(default_factory=lambda: [0.0] * len(AERIAL_BANDS))
    aerial_sumsq: list[float] = field(default_factory=lambda: [0.0] * len(AERIAL_BANDS))
    aerial_pixels: int = 0
    s2_sum: list[float] = field(default_factory=lambda: [0.0] * len(S2_BANDS))
    s2_sumsq: list[float] = field(default_factory=lambda: [0.0] * len(S2_BANDS))
    s2_pixels: int = 0
    max_time_steps: int = 0

    def add(self, sample: Flair2Sample) -> None:
        """Account for one sample."""
        self.keys.append(sample.patch_id)
        bands = sample.aerial.reshape(sample.aerial.shape[0], -1).astype(np.float64)
        self.aerial_sum = (np.asarray(self.aerial_sum) + bands.sum(axis=1)).tolist()
        self.aerial_sumsq = (np.asarray(self.aerial_sumsq) + (bands**2).sum(axis=1)).tolist()
        self.aerial_pixels += bands.shape[1]
        if sample.label is not None:
            self.class_pixels[sample.patch_id] = np.bincount(
                sample.label.ravel(), minlength=NUM_CLASSES
            ).tolist()
        if sample.s2 is not None:
            s2 = sample.s2.transpose(1, 0, 2, 3).reshape(sample.s2.shape[1], -1).astype(np.float64)
            self.s2_sum = (np.asarray(self.s2_sum) + s2.sum(axis=1)).tolist()
            self.s2_sumsq = (np.asarray(self.s2_sumsq) + (s2**2).sum(axis=1)).tolist()
            self.s2_pixels += s2.shape[1]
            self.max_time_steps = max(self.max_time_steps, sample.s2.shape[0])


def _mean_std(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[list[float], list[float]]:
    if count == 0:
        return [], []
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def build_manifest(
    params: dict[str, Any], fingerprint: str, shard_records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Merge per-shard sidecar records into the manifest dictionary."""
    class_total = np.zeros(NUM_CLASSES, dtype=np.int64)
    aerial = [np.zeros(len(AERIAL_BANDS)), np.zeros(len(AERIAL_BANDS)), 0]
    s2 = [np.zeros(len(S2_BANDS)), np.zeros(len(S2_BANDS)), 0]
    samples: dict[str, dict[str, Any]] = {}
    shards = []
    max_steps = 0
    for record in shard_records:
        stats = record["stats"]
        shards.append(
            {k: record[k] for k in ("name", "domain", "num_samples", "bytes", "sha256")}
            | {"keys": stats["keys"]}
        )
        for key in stats["keys"]:
            pixels = stats["class_pixels"].get(key)
            samples[key] = {"shard": record["name"], "domain": record["domain"], "class_pixels": pixels}
            if pixels is not None:
                class_total += np.asarray(pixels, dtype=np.int64)
        aerial[0] += stats["aerial_sum"]
        aerial[1] += stats["aerial_sumsq"]
        aerial[2] += stats["aerial_pixels"]
        s2[0] += stats["s2_sum"]
        s2[1] += stats["s2_sumsq"]
        s2[2] += stats["s2_pixels"]
        max_steps = max(max_steps, stats["max_time_steps"])
    aerial_mean, aerial_std = _mean_std(*aerial)
    s2_mean, s2_std = _mean_std(*s2)
    total = int(class_total.sum())
    return {
        "kind": MANIFEST_KIND,
        "format": FORMAT_VERSION,
        "params": params,
        "fingerprint": fingerprint,
        "num_samples": len(samples),
        "domains": sorted({s["domain"] for s in shards}),
        "shards": shards,
        "samples": samples,
        "class_pixels": class_total.tolist(),
        "class_frequencies": (class_total / total).tolist() if total else [],
        "band_stats": {
            "aerial": {"bands": list(AERIAL_BANDS), "mean": aerial_mean, "std": aerial_std},
            "s2": {"bands": list(S2_BANDS), "mean": s2_mean, "std": s2_std},
        },
        "max_time_steps": max_steps,
    }


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    """Load and check ``shard_dir/manifest.json``.

    Raises:
        ShardFormatError: missing, unparsable, or written by another format version.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        if not path.parent.is_dir():  # most often a relative path read from another working folder
            where = "" if path.is_absolute() else f" (relative to the working folder {Path.cwd()})"
            raise ShardFormatError(
                f"{path.parent}: no such shard-set folder: looked for {path.parent.resolve()}{where}; run "
                "from the folder the config's paths are relative to, or give absolute paths"
            )
        raise ShardFormatError(
            f"{path}: manifest missing: the shard set is incomplete or not a damformer shard set; "
            "re-run 'damformer shard' (it resumes) to finish it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{path}: cannot parse the manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise ShardFormatError(f"{path}: expected a {MANIFEST_KIND} manifest")
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: shard format: expected {FORMAT_VERSION}, found {manifest.get('format')}; "
            "re-shard with this damformer version"
        )
    return manifest
