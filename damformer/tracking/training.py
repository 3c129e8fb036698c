"""What a training run reports to MLflow: run name, tags, system metrics, eval metrics, its files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from damformer.config import RunConfig
from damformer.data.classes import FLAIR_CLASSES
from damformer.eval.metrics import SegmentationScores
from damformer.runtime.artifacts import RunFolder
from damformer.shards.tario import sha256_file
from damformer.tracking.mlflow_tracker import (
    ARTIFACT_ROOT,
    Tracker,
    default_tracking_uri,
    flatten,
    git_commit,
    store_folder,
)


def _domains(selection: list[str] | None, folders: list[str]) -> str:
    if selection:
        return "+".join(selection)
    return "+".join(Path(folder).name for folder in folders) or "-"


def run_name(config: RunConfig) -> str:
    """Training first, then model, inputs, source->target: ``UDA: DAM-Former RGB+NIR+E+T south->north``."""
    data = config.data
    source = _domains(data.source_domains, data.source)
    target = _domains(data.target_domains, data.target or data.target_test)
    mode = "UDA" if config.uda.enabled else "source only"  # first: MLflow's table cuts long names
    return f"{mode}: {config.model.name} {source}->{target}"


def start_tracking(
    config: RunConfig,
    output_dir: Path,
    *,
    run_id: str | None,
    engine: str,
    world_size: int,
    hostnames: Sequence[str],
) -> Tracker:
    """Open (or, on resume, continue) the run's MLflow run and log params and tags."""
    log_config = config.log
    uri = log_config.tracking_uri or default_tracking_uri(output_dir)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    tags = {
        "seed": str(config.run.seed),
        "inputs": config.model.inputs,
        "git_commit": git_commit(),
        "world_size": str(world_size),
        "engine": engine,
        "precision": config.run.precision,
        "hostnames": ",".join(sorted(set(hostnames))),
        "model": config.model.name,
        "bands": config.model.bands,
        "temporal": str(config.model.temporal),
        "uda": str(config.uda.enabled),
        "output_dir": str(output_dir.resolve()),
    }
    if log_config.parent_run_id:
        tags["mlflow.parentRunId"] = log_config.parent_run_id  # nested under a study in the MLflow UI
    tracker = Tracker(
        uri,
        log_config.experiment or "damformer",
        log_config.run_name or run_name(config),
        artifact_root=store_folder(output_dir) / ARTIFACT_ROOT if local else None,
        run_id=run_id,
        tags=tags,
    )
    tracker.log_params(active_params(config))
    tracker.set_tags(tags | {"mlflow.note.content": UNITS})  # the run's description in the UI
    if log_config.system_metrics:
        tracker.start_system_metrics()
    return tracker


# Keys that take part only with the temporal branch ("+T"): inactive, so not logged, without it.
TEMPORAL_KEYS = ("model.utae_widths", "model.fusion_levels", "model.fusion_zero_init", "model.footprint",
                 "model.s2_bands", "optim.temporal_lr_mult", "uda.lr_weight", "uda.ensemble_lr_weight",
                 "uda.ensemble")  # fmt: skip
UNITS = (
    "Units: mIoU, mIoU without other, IoU/<class>, accuracy and val mIoU are in percent; "
    "pseudo_confidence is the 0-1 fraction of target pixels above the threshold; every loss and rate is "
    "the mean over the interval before its step."
)


def active_params(config: RunConfig) -> dict[str, str]:
    """The run's config as MLflow params, without the keys this run does not use.

    A source-only run logs no ``uda.*`` value but ``uda.enabled``, an aerial-only one no temporal key:
    otherwise "show diff only" in MLflow lists settings that changed nothing.
    """
    params = flatten(config.to_dict())
    if not config.uda.enabled:
        params = {k: v for k, v in params.items() if not k.startswith("uda.") or k == "uda.enabled"}
    if not config.model.temporal:
        params = {k: v for k, v in params.items() if k not in TEMPORAL_KEYS}
    return params


def system_metrics(*, samples_per_second: float, device: torch.device) -> dict[str, float]:
    """Training throughput (CPU, memory and GPU use: MLflow's own ``system/`` metrics, log.system_metrics)."""
    del device  # memory over time comes from MLflow's sampling; kept for the callers' signature
    return {"throughput samples/s": samples_per_second}


def eval_metrics(scores: SegmentationScores) -> dict[str, float]:
    """MIoU (13 and 12 classes), accuracy and ``IoU/<class>``, in percent as every table prints them."""
    metrics = {
        "mIoU": 100 * scores.miou,
        "mIoU without other": 100 * scores.miou_without_other,
        "accuracy": 100 * scores.accuracy,
    }
    for cls, value in zip(FLAIR_CLASSES, scores.iou, strict=False):
        if np.isfinite(value):
            metrics[f"IoU/{cls.name}"] = 100 * float(value)
    return metrics


def log_run_end(
    config: RunConfig,
    folder: RunFolder,
    tracker: Tracker,
    *,
    figures: list[Path],
    iteration: int,
    validation: SegmentationScores | None = None,
) -> None:
    """Rank 0 at the end of a run: the run folder's files and the validation scores, to the tracker.

    ``validation``: the scores on ``data.target_val``, logged as ``val mIoU`` / ``val accuracy``.
    """
    if validation is not None:
        tracker.log_metrics(
            {"val mIoU": 100 * validation.miou, "val accuracy": 100 * validation.accuracy}, step=iteration
        )
    for path in figures:
        tracker.log_artifact(path, "figures")
    tracker.log_artifact(folder.config)
    tracker.log_artifact(folder.history)
    checkpoint = folder.checkpoint
    if config.log.upload_checkpoint:  # a copy in the artifact store (GBs for MiT-b5)
        tracker.log_artifact(checkpoint, "checkpoint")
    else:  # a reference: where it is and what it is
        tracker.set_tags(
            {"checkpoint.path": str(checkpoint.resolve()), "checkpoint.sha256": sha256_file(checkpoint)}
        )
