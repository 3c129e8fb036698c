"""Where each run of a study stands, read from its folder, and the study's own small state file.

A run is *finished* when its ``scores.json`` records the last iteration of its schedule (it is written
after the final evaluation), *interrupted* when it has a checkpoint but is not finished, *pending*
otherwise, and *changed* when the config it was trained with (its ``config.yaml``) differs from what
the study resolves for it now in a key that ``train --resume`` would refuse: its scores belong to
another experiment. ``OUTPUT/study.json`` adds what a folder cannot say: the MLflow parent run, and
how the last local attempt of each run ended (a failed run is retried on the next invocation, from its
checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from damformer.atomic import atomic_write_bytes
from damformer.runtime.artifacts import RunFolder
from damformer.study.spec import Study, StudyRun

STATE_FILE = "study.json"
FINISHED, INTERRUPTED, PENDING, FAILED = "finished", "interrupted", "pending", "failed"
CHANGED = "changed"


def read_scores(run: StudyRun) -> dict[str, Any] | None:
    """The run's ``scores.json`` (None when absent or unreadable)."""
    path = RunFolder(run.output_dir).scores
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def changed_keys(study: Study, run: StudyRun) -> list[tuple[str, Any, Any]]:
    """(key, trained with, resolved now) of every key the run's folder disagrees on (none: no folder yet)."""
    import yaml

    from damformer.config import RESUMABLE, config_changes

    saved_path = RunFolder(run.output_dir).config
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []  # unreadable: the training refuses it with its own message when resumed
    current = study.resolved_config(run).to_dict()
    return [change for change in config_changes(saved, current) if not change[0].startswith(RESUMABLE)]


def folder_status(study: Study, run: StudyRun) -> str:
    """finished, interrupted, pending or changed, from the run's folder alone."""
    if changed_keys(study, run):
        return CHANGED
    scores = read_scores(run)
    if scores is not None and scores.get("iteration", -1) >= study.resolved_config(run).optim.max_iters:
        return FINISHED
    if RunFolder(run.output_dir).checkpoint.is_file():
        return INTERRUPTED
    return PENDING


class StudyState:
    """``OUTPUT/study.json``: the parent MLflow run and each run's last local attempt (atomic writes)."""

    def __init__(self, study: Study) -> None:
        self.path = study.output_dir / STATE_FILE
        self.values: dict[str, Any] = {"name": study.name, "parent_run_id": None, "runs": {}}
        if self.path.is_file():
            with contextlib.suppress(ValueError):  # damaged: attempt counts are lost, folders say the rest
                self.values.update(json.loads(self.path.read_text()))

    @property
    def parent_run_id(self) -> str | None:
        """The study's MLflow parent run, once created."""
        return self.values.get("parent_run_id")

    @parent_run_id.setter
    def parent_run_id(self, value: str | None) -> None:
        self.values["parent_run_id"] = value
        self.save()

    def attempt(self, run: StudyRun) -> dict[str, Any]:
        """The record of ``run``'s last attempt (empty if never launched here)."""
        return self.values["runs"].get(run.key, {})

    def record(self, run: StudyRun, **fields: Any) -> None:
        """Update ``run``'s record (status, exit code, attempts, times) and save."""
        entry = self.values["runs"].setdefault(run.key, {"attempts": 0})
        entry.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        """Write the state atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(self.values, indent=1).encode())


def status(study: Study, run: StudyRun, state: StudyState) -> str:
    """The folder's status, or ``failed`` when the last attempt failed and the run is not finished."""
    found = folder_status(study, run)
    if found != FINISHED and state.attempt(run).get("status") == FAILED:
        return FAILED
    return found


def refuse_changed(study: Study, *, retrain: bool) -> None:
    """Stop a study whose trained runs no longer match it, naming them and their keys, unless ``retrain``.

    With ``retrain`` each changed run's folder is moved aside (``seed-S.changed-YYYYmmdd-HHMMSS``, nothing
    is deleted) and the run trains again from scratch.

    Raises:
        StudyError: the changed runs, each with its differing keys, and the way out.
    """
    from damformer.study.spec import StudyError

    changed = {run: keys for run in study.runs if (keys := changed_keys(study, run))}
    if not changed:
        return
    if not retrain:
        described = "; ".join(
            f"{run.key} ({', '.join(f'{k}: {old!r} then, {new!r} now' for k, old, new in keys[:4])})"
            for run, keys in changed.items()
        )
        raise StudyError(
            f"{study.path}: {len(changed)} run(s) were trained with another config than the study gives them "
            f"now: {described}. Restore the study file (and its configs), or pass --retrain-changed to train "
            "them again (their folders are moved aside, not deleted)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for run in changed:
        aside = run.output_dir.with_name(f"{run.output_dir.name}.changed-{stamp}")
        run.output_dir.rename(aside)
