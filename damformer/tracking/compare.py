"""Compare runs side by side: model, inputs, mIoU and IoU per class, from run folders or MLflow.

    damformer compare runs/demo/source_only runs/demo/uda runs/demo/damformer   # run folders
    damformer compare --tracking-uri http://127.0.0.1:5000 --experiment ablation

Run folders need no tracking at all: each holds ``config.yaml`` and ``scores.json``. With
``--tracking-uri`` the rows come from the runs of one MLflow experiment (their final metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from damformer.data.classes import FLAIR_CLASSES
from damformer.errors import DamformerError
from damformer.runtime.artifacts import RunFolder
from damformer.tracking.store_lock import sqlite_path, store_opening


class CompareError(DamformerError):
    """A run folder or experiment cannot be read."""


@dataclass
class RunRow:
    """One run's line in the table."""

    name: str
    model: str
    inputs: str
    training: str  # "UDA" or "source only"
    status: str
    miou: float
    accuracy: float
    iou: dict[str, float] = field(default_factory=dict)  # class name -> IoU (absent: not scored)


def _inputs(bands: str, temporal: bool | str) -> str:
    return f"{bands}{'+T' if str(temporal) == 'True' else ''}"


def _training(uda: bool | str) -> str:
    return "UDA" if str(uda) == "True" else "source only" if str(uda) == "False" else "?"


def rows_from_folders(folders: Sequence[Path]) -> list[RunRow]:
    """A row per run folder (``config.yaml`` + ``scores.json``, written by ``damformer train``)."""
    from damformer.config import build_section
    from damformer.models.factory import ModelConfig

    rows = []
    for folder in folders:
        scores_path, config_path = RunFolder(folder).scores, RunFolder(folder).config
        if RunFolder(folder).failure.is_file() and config_path.is_file() and not scores_path.is_file():
            rows.append(_failed_row(Path(folder)))
            continue
        for path in (config_path, scores_path):
            if not path.is_file():
                raise CompareError(
                    f"{path}: not found ({folder} is not a finished run folder: "
                    "damformer train writes scores.json at the end)"
                )
        try:
            scores = json.loads(scores_path.read_text())
            config = yaml.safe_load(config_path.read_text())
            model = build_section(ModelConfig, config["model"], "model")
        except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
            raise CompareError(f"{folder}: cannot read its config.yaml / scores.json ({exc})") from None
        iou = {
            cls.name: float(value)
            for cls, value in zip(FLAIR_CLASSES, scores["iou"], strict=False)
            if value is not None and math.isfinite(value)
        }
        rows.append(
            RunRow(folder.name, model.name, _inputs(model.bands, model.temporal),
                   _training(config.get("uda", {}).get("enabled", True)), "done", scores["miou"],
                   scores["accuracy"], iou)
        )  # fmt: skip
    return rows


def _failed_row(folder: Path) -> RunRow:
    """A run that stopped for good (failure.json): its model, and why, instead of scores."""
    from damformer.config import build_section
    from damformer.models.factory import ModelConfig

    try:
        config = yaml.safe_load(RunFolder(folder).config.read_text())
        failure = json.loads(RunFolder(folder).failure.read_text())
        model = build_section(ModelConfig, config["model"], "model")
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
        raise CompareError(f"{folder}: cannot read its config.yaml / failure.json ({exc})") from None
    status = f"failed at iteration {failure.get('iteration', '?')}"
    training = _training(config.get("uda", {}).get("enabled", True))
    return RunRow(folder.name, model.name, _inputs(model.bands, model.temporal), training, status, math.nan,
                  math.nan)  # fmt: skip


def rows_from_mlflow(uri: str, experiment: str) -> list[RunRow]:
    """A row per run of an MLflow experiment (latest mIoU, accuracy and IoU/<class> metrics)."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    database = sqlite_path(uri)
    if database is not None and not database.is_file():  # MLflow would create an empty store there
        raise CompareError(
            f"{database}: no MLflow store there (runs write one beside their folders, e.g. runs/mlflow.db; "
            "a server: --tracking-uri http://HOST:PORT)"
        )
    try:
        with store_opening(uri):  # an older store is migrated on opening
            client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"{uri}: no experiment {experiment!r} (there: {', '.join(names) or 'none'})")
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    except CompareError:
        raise
    except Exception as exc:  # any backend failure becomes one clear message
        raise CompareError(
            f"{uri}: cannot read experiment {experiment!r} ({type(exc).__name__}: {exc})"
        ) from None
    rows = []
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        iou = {
            cls.name: metrics[f"IoU/{cls.name}"] / 100
            for cls in FLAIR_CLASSES
            if f"IoU/{cls.name}" in metrics
        }
        rows.append(
            RunRow(
                run.info.run_name or run.info.run_id,
                tags.get("model", "?"),
                _inputs(tags.get("bands", "?"), tags.get("temporal", "False")),
                _training(tags.get("uda", "?")),
                run.info.status.lower(),
                metrics.get("mIoU", math.nan) / 100,  # logged in percent
                metrics.get("accuracy", math.nan) / 100,
                iou,
            )
        )
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def format_table(rows: Sequence[RunRow]) -> str:
    """Runs as rows; mIoU, accuracy and the IoU of every class scored by any run as columns."""
    if not rows:
        return "(no runs)"
    classes = [cls.name for cls in FLAIR_CLASSES if any(cls.name in row.iou for row in rows)]
    short = [name.split()[0][:6] for name in classes]  # "herbaceous vegetation" -> "herbac"
    head = ["run", "model", "inputs", "training", "status", "mIoU", "acc", *short]
    body = [
        [row.name, row.model, row.inputs, row.training, row.status, _percent(row.miou),
         _percent(row.accuracy), *(_percent(row.iou.get(name)) for name in classes)]
        for row in rows
    ]  # fmt: skip
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    lines = []
    for line in [head, *body]:
        cells = [f"{cell:<{widths[i]}}" if i < 5 else f"{cell:>{widths[i]}}" for i, cell in enumerate(line)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    legend = ", ".join(f"{s} = {name}" for s, name in zip(short, classes, strict=True) if s != name)
    if legend:
        lines.append(f"IoU per class in %; {legend}")
    return "\n".join(lines)
