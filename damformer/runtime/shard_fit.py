"""Shard sets checked against a model (and one another) before any compute: training and evaluation alike.

For each folder of each set: it fits the model (classes, labels, Sentinel-2: ``ShardSet.check_fits``;
aerial bands; the model's footprint against its aerial patches and Sentinel-2 crops), and it is alike
the first set (patch size; for +T models the Sentinel-2 crop size and monthly or single dates). A
mismatch is one :class:`ConfigError` naming the set, the folder and both values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damformer.data.sentinel import S2_PIXEL_M
from damformer.errors import ConfigError
from damformer.models.damformer import BAND_SETS
from damformer.shards.shardset import ShardSet


def check_shard_sets(model: Any, sets: Sequence[tuple[str, ShardSet, Sequence[Path | str], bool]]) -> None:
    """Check every ``(role, shard set, its folders, labelled?)`` against ``model`` and the first set.

    Raises:
        ConfigError: naming the role (``data.target``, ``--shards``), the folder and both values.
    """
    reference: SetGeometry | None = None
    for role, shard_set, folders, labels in sets:
        shard_set.check_fits(model, role=role, labels=labels, folders=folders)
        for folder in folders:
            geometry = set_geometry(folder)
            if reference is not None:  # first against the others: the message names both sets
                _check_alike(geometry, reference, role=role, temporal=model.temporal)
            _check_model_fits(model, geometry, role=role)
            reference = reference or geometry


@dataclass(frozen=True)
class SetGeometry:
    """What a model meets in one shard-set folder: patch size, bands, Sentinel-2 crop and dates."""

    folder: str
    role: str
    patch_px: int
    pixel_m: float
    aerial_bands: int
    s2_crop: int | None  # None: no Sentinel-2
    monthly: bool | None

    @property
    def patch_m(self) -> float:
        """The aerial patch's side in metres."""
        return self.patch_px * self.pixel_m


def set_geometry(folder: Path | str, role: str = "") -> SetGeometry:
    """Read one folder's geometry: its manifest's sharding parameters and its first sample's shapes."""
    shard_set = ShardSet([folder])
    sample = shard_set.first_sample()
    sentinel = shard_set.manifests[0]["params"].get("sentinel") or {}
    crop = None if sample.s2 is None else int(sample.s2.shape[-1])
    monthly = sentinel.get("monthly_average") if crop is not None else None
    return SetGeometry(
        str(folder), role, int(sample.aerial.shape[-1]), abs(float(sample.transform.a)),
        int(sample.aerial.shape[0]), crop, monthly,
    )  # fmt: skip


def _check_model_fits(model: Any, geometry: SetGeometry, *, role: str) -> None:
    """The model's bands and Sentinel-2 footprint against one folder."""
    needed = len(BAND_SETS[model.bands])
    if geometry.aerial_bands < needed:
        raise ConfigError(
            f"{role}: {geometry.folder} holds {geometry.aerial_bands} aerial band(s), model.bands "
            f"{model.bands} needs {needed}"
        )
    if model.temporal and geometry.s2_crop is not None:
        expected = geometry.patch_m / (geometry.s2_crop * S2_PIXEL_M)
        if abs(model.footprint - expected) > 0.02 * expected:
            raise ConfigError(
                f"model.footprint: {model.footprint:g}, but {role} {geometry.folder} has aerial patches of "
                f"{geometry.patch_px} px ({geometry.patch_m:g} m) that cover {expected:.4g} of their "
                f"{geometry.s2_crop}-pixel Sentinel-2 crop ({geometry.s2_crop * S2_PIXEL_M:g} m): set "
                f"model.footprint={expected:.4g}, or shard this set with the --sat-size of the others"
            )


def _check_alike(geometry: SetGeometry, reference: SetGeometry, *, role: str, temporal: bool) -> None:
    """Every set of a run has the first set's patch size and (for +T models) Sentinel-2 crop and dates."""
    found, ref = geometry, reference
    where = f"{role}: {found.folder}"
    versus = f"{ref.folder} (the run's first set)"
    if (found.patch_px, round(found.pixel_m, 6)) != (ref.patch_px, round(ref.pixel_m, 6)):
        raise ConfigError(
            f"{where} holds aerial patches of {found.patch_px} px at {found.pixel_m:g} m, {versus} "
            f"{ref.patch_px} px at {ref.pixel_m:g} m: a model is trained and scored on one patch size; "
            "shard every set of a run from patches of the same size"
        )
    if not temporal:
        return
    if found.s2_crop != ref.s2_crop:
        raise ConfigError(
            f"{where} holds Sentinel-2 crops of {found.s2_crop} px (damformer shard --sat-size), {versus} "
            f"{ref.s2_crop} px: the LR branch reads one crop size; re-shard it with --sat-size {ref.s2_crop}"
        )
    if found.monthly != ref.monthly:
        kind = {True: "monthly means", False: "single dates (--no-monthly)"}
        raise ConfigError(
            f"{where} holds Sentinel-2 {kind[bool(found.monthly)]}, {versus} {kind[bool(ref.monthly)]}: "
            "the temporal branch would meet another kind of series than it learnt; shard every set alike"
        )
