"""A study file: the grid of (configuration, seed) trainings of an ablation, as one YAML.

    name: paper                          # the MLflow experiment; the default output folder's name
    output_dir: runs/studies/paper       # each run in OUTPUT/runs/NAME/seed-S (default runs/studies/NAME)
    seeds: [0, 1, 2]
    set:                                 # overrides of every run (damformer train --set)
      data.source: [shards/south]
      optim.max_iters: 40000
    configs:                             # paths or globs (relative to the working folder), or entries
      - configs/ablation/*-*.yaml        # one row per file, named after it (damformer-rgbne-t)
      - name: damformer-no-ep            # an entry of its own: a config plus its own overrides
        config: configs/ablation/damformer-rgbne-t.yaml
        set: {uda.ensemble_lr_weight: 0}
        seeds: [0, 1]                    # its own seeds (default: the study's)
    tracking: true                       # MLflow parent run + nested runs (default: true)
    tracking_uri: null                   # default: sqlite:///OUTPUT/mlflow.db (artifacts: OUTPUT/mlartifacts)
    figure:
      patch: null                        # target test patch of the figure; null: most building pixels
    compare:                             # paired comparisons over the shared seeds (damformer.study.paired)
      baseline: source-only              # every other row against this one
      pairs: [[damformer, uda-unet_t]]   # and/or explicit (row, baseline) pairs

Overrides apply in this order: the config file, the study's ``set``, the entry's ``set``, the command
line's ``--set``, then the run's seed and folder.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damformer.config import read_yaml
from damformer.errors import DamformerError

STUDY_KEYS = ("name", "output_dir", "seeds", "set", "configs", "tracking", "tracking_uri", "figure")
STUDY_KEYS += ("compare",)
ENTRY_KEYS = ("name", "config", "set", "seeds")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class StudyError(DamformerError):
    """A study file is unreadable or inconsistent (the message names the file and the key)."""


@dataclass(frozen=True)
class StudyEntry:
    """One row of the study's table: a training config and its own overrides."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None  # None: the study's seeds


@dataclass(frozen=True)
class StudyRun:
    """One training of the study: an entry with a seed, in its own folder."""

    entry: StudyEntry
    seed: int
    output_dir: Path

    @property
    def key(self) -> str:
        """``NAME/seed-S``: how the run is named in tables, logs and the state file."""
        return f"{self.entry.name}/seed-{self.seed}"


@dataclass
class Study:
    """A parsed study file (see the module docstring)."""

    path: Path
    name: str
    output_dir: Path
    seeds: list[int]
    overrides: list[str]
    entries: list[StudyEntry]
    tracking: bool = True
    tracking_uri: str | None = None
    figure_patch: str | None = None
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (row, baseline)
    extra_overrides: list[str] = field(default_factory=list)  # the command line's --set

    @property
    def runs(self) -> list[StudyRun]:
        """Every (entry, seed), entry by entry, in the study file's order."""
        return [
            StudyRun(entry, seed, self.output_dir / "runs" / entry.name / f"seed-{seed}")
            for entry in self.entries
            for seed in (self.seeds if entry.seeds is None else entry.seeds)
        ]

    def run_overrides(self, run: StudyRun) -> list[str]:
        """The ``--set`` assignments of one run (study, entry, command line, then seed and folder)."""
        return [
            *self.overrides,
            *run.entry.overrides,
            *self.extra_overrides,
            f"run.seed={run.seed}",
            f"run.output_dir={run.output_dir}",
        ]

    def resolved_config(self, run: StudyRun, *, check_files: bool = True) -> Any:
        """The run's validated :class:`damformer.config.RunConfig` (errors name the study entry)."""
        from damformer.config import ConfigError, load_config

        try:
            return load_config(run.entry.config, self.run_overrides(run), check_files=check_files)
        except ConfigError as exc:
            raise StudyError(f"{self.path}: {run.key} ({run.entry.config}): {exc}") from None


def _assignments(value: Any, where: str) -> list[str]:
    """``set`` as a mapping ``{section.key: value}`` or a list of ``section.key=value`` strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{key}={json.dumps(item)}" for key, item in value.items()]  # JSON is YAML
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return list(value)
    raise StudyError(f"{where}: expected a mapping of section.key: value, or a list of section.key=value")


def _entries(value: Any, path: Path) -> list[StudyEntry]:
    if not isinstance(value, list) or not value:
        raise StudyError(f"{path}: configs: expected a non-empty list of config paths, globs or entries")
    entries: list[StudyEntry] = []
    for index, item in enumerate(value):
        where = f"{path}: configs[{index}]"
        if isinstance(item, str):
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not matches:
                raise StudyError(
                    f"{where}: {item!r} matches no file (paths are relative to the working folder)"
                )
            entries += [StudyEntry(Path(match).stem, Path(match)) for match in matches]
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(ENTRY_KEYS))
            if unknown or "config" not in item:
                raise StudyError(
                    f"{where}: keys {', '.join(ENTRY_KEYS)} (config required), found {', '.join(item)}"
                )
            config = Path(item["config"])
            seeds = item.get("seeds")
            if seeds is not None:
                seeds = tuple(_seeds(seeds, f"{where}: seeds"))
            entries.append(
                StudyEntry(
                    str(item.get("name", config.stem)),
                    config,
                    tuple(_assignments(item.get("set"), where)),
                    seeds,
                )
            )
        else:
            raise StudyError(f"{where}: expected a path, a glob or a mapping, found {item!r}")
    for entry in entries:
        if not entry.config.is_file():
            raise StudyError(f"{path}: config {entry.config} of entry {entry.name!r} not found")
        if not _NAME.match(entry.name):
            raise StudyError(f"{path}: entry name {entry.name!r}: use letters, digits and . _ + - only")
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StudyError(
            f"{path}: entry names must be unique, repeated: {', '.join(repeated)} (give each a name:)"
        )
    return entries


def _seeds(seeds: Any, where: str) -> list[int]:
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise StudyError(f"{where}: expected a non-empty list of integers, found {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where}: repeated values in {seeds}")
    return list(seeds)


def _comparisons(value: Any, entries: list[StudyEntry], path: Path) -> list[tuple[str, str]]:
    """``compare: {baseline: NAME, pairs: [[ROW, BASELINE], ...]}`` as (row, baseline) pairs, in order."""
    if value is None:
        return []
    where = f"{path}: compare"
    if not isinstance(value, dict) or set(value) - {"baseline", "pairs"}:
        raise StudyError(f"{where}: expected a mapping with baseline and/or pairs")
    names = [entry.name for entry in entries]
    pairs: list[tuple[str, str]] = []
    baseline = value.get("baseline")
    if baseline is not None:
        pairs += [(name, str(baseline)) for name in names if name != baseline]
    listed = value.get("pairs") or []
    if not isinstance(listed, list) or not all(isinstance(p, list) and len(p) == 2 for p in listed):
        raise StudyError(f"{where}.pairs: expected a list of [row, baseline] pairs")
    pairs += [(str(row), str(base)) for row, base in listed if (str(row), str(base)) not in pairs]
    for row, base in pairs:
        for name in (row, base):
            if name not in names:
                raise StudyError(f"{where}: {name!r} is not a row of the study (rows: {', '.join(names)})")
        if row == base:
            raise StudyError(f"{where}: {row!r} compared with itself")
    return pairs


def load_study(
    path: Path | str, *, overrides: list[str] | None = None, output_dir: Path | None = None
) -> Study:
    """Read and check a study file; ``overrides`` (``--set``) apply to every run after the file's own.

    Raises:
        StudyError: unreadable YAML, unknown keys, configs that do not exist, repeated names.
    """
    path = Path(path)
    values = read_yaml(path, "the study file", StudyError)
    if not isinstance(values, dict):
        raise StudyError(f"{path}: expected a mapping with keys {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(values) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(STUDY_KEYS)}")
    name = str(values.get("name") or path.stem)
    if not _NAME.match(name):
        raise StudyError(f"{path}: name {name!r}: use letters, digits and . _ + - only")
    seeds = _seeds(values.get("seeds", [0]), f"{path}: seeds")
    figure = values.get("figure") or {}
    if not isinstance(figure, dict) or set(figure) - {"patch"}:
        raise StudyError(f"{path}: figure: expected a mapping with the key patch")
    tracking = values.get("tracking", True)
    if not isinstance(tracking, bool):
        raise StudyError(f"{path}: tracking: expected true or false, found {tracking!r}")
    entries = _entries(values.get("configs"), path)
    return Study(
        path=path,
        name=name,
        output_dir=Path(output_dir or values.get("output_dir") or Path("runs") / "studies" / name),
        seeds=list(seeds),
        overrides=_assignments(values.get("set"), f"{path}: set"),
        entries=entries,
        comparisons=_comparisons(values.get("compare"), entries, path),
        tracking=tracking,
        tracking_uri=values.get("tracking_uri"),
        figure_patch=figure.get("patch"),
        extra_overrides=list(overrides or []),
    )
