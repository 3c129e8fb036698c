"""What a training run reports to MLflow: run name, tags, system metrics, eval metrics, figures."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damformer.config import RunConfig
from damformer.data.classes import FLAIR_CLASSES
from damformer.data.loader import LoaderOptions, ShardLoader, ShardSet
from damformer.data.shard_io import sha256_file
from damformer.eval.evaluate import eval_mode
from damformer.eval.metrics import SegmentationScores
from damformer.models.damformer import model_inputs
from damformer.tracking.figures import confusion_png, mosaic_png
from damformer.tracking.mlflow_tracker import (
    ARTIFACT_ROOT,
    Tracker,
    default_tracking_uri,
    flatten,
    git_commit,
    store_folder,
)

CONFUSION_PNG = "confusion_matrix.png"
MOSAIC_PNG = "prediction_mosaic.png"


def _domains(selection: list[str] | None, folders: list[str]) -> str:
    if selection:
        return "+".join(selection)
    return "+".join(Path(folder).name for folder in folders) or "-"


def run_name(config: RunConfig) -> str:
    """The ablation: model x inputs x source->target, e.g. ``DAM-Former RGB+NIR+E+T south->north``."""
    data = config.data
    source = _domains(data.source_domains, data.source)
    target = _domains(data.target_domains, data.target or data.target_test)
    mode = "" if config.uda.enabled else " (source only)"
    return f"{config.model.name} {source}->{target}{mode}"


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
    tracker.log_params(flatten(config.to_dict()))
    tracker.set_tags(tags)
    if log_config.system_metrics:
        tracker.start_system_metrics()
    return tracker


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


def _rgb(aerial: torch.Tensor) -> np.ndarray:
    """(C, H, W) aerial with 0..255 values -> (H, W, 3) uint8."""
    return aerial[:3].float().clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def write_figures(
    model: torch.nn.Module,
    test_set: ShardSet,
    scores: SegmentationScores,
    output_dir: Path,
    *,
    patches: int,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    title: str = "",
) -> list[Path]:
    """The confusion matrix PNG and a mosaic of the first ``patches`` target test patches."""
    classes = FLAIR_CLASSES[: scores.matrix.shape[0]]
    written = [confusion_png(scores.matrix, classes, output_dir / CONFUSION_PNG, title=title)]
    if patches < 1:
        return written
    loader = ShardLoader(
        test_set, LoaderOptions(batch_size=patches, augment=False, pad=False, shuffle_buffer=1)
    )
    batch: dict[str, Any] = next(iter(loader))
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with eval_mode(model), autocast():
        prediction = model(*model_inputs(batch))["hr"].argmax(dim=1).cpu().numpy()
    labels = batch.get("label")
    rows = [
        (_rgb(batch["aerial"][i]), labels[i].cpu().numpy() if labels is not None else None, prediction[i])
        for i in range(prediction.shape[0])
    ]
    titles = [str(key) for key in batch["keys"]] if "keys" in batch else None
    written.append(mosaic_png(rows, classes, output_dir / MOSAIC_PNG, titles=titles))
    return written


def report_end(
    config: RunConfig,
    output_dir: Path,
    scores: SegmentationScores,
    *,
    model: torch.nn.Module,
    test_set: ShardSet,
    tracker: Tracker,
    iteration: int,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    validation: SegmentationScores | None = None,
) -> None:
    """Rank 0 at the end of a run: scores.json, the figures, and the run's artifacts for the tracker.

    ``validation``: the scores on ``data.target_val``, kept in scores.json under "validation" and
    logged as ``val mIoU`` / ``val accuracy``.
    """
    from damformer.atomic import atomic_write_bytes

    payload = scores.to_json(iteration=iteration, seed=config.run.seed)
    if validation is not None:
        payload["validation"] = {k: v for k, v in validation.to_json().items() if k != "confusion_matrix"}
        tracker.log_metrics(
            {"val mIoU": 100 * validation.miou, "val accuracy": 100 * validation.accuracy}, step=iteration
        )
    atomic_write_bytes(output_dir / "scores.json", json.dumps(payload).encode())
    title = f"{run_name(config)}: target test, mIoU {100 * scores.miou:.2f}"
    figures = write_figures(
        model, test_set, scores, output_dir, patches=config.log.mosaic_patches, autocast=autocast, title=title
    )
    for path in figures:
        tracker.log_artifact(path, "figures")
    tracker.log_artifact(output_dir / "config.yaml")
    tracker.log_artifact(output_dir / "history.json")
    checkpoint = output_dir / "checkpoint.pt"
    if config.log.upload_checkpoint:  # a copy in the artifact store (GBs for MiT-b5)
        tracker.log_artifact(checkpoint, "checkpoint")
    else:  # a reference: where it is and what it is
        tracker.set_tags(
            {"checkpoint.path": str(checkpoint.resolve()), "checkpoint.sha256": sha256_file(checkpoint)}
        )
