"""What a finished run leaves in its folder besides the checkpoint: scores.json and the figures.

Written by rank 0 at the end of ``damformer train`` (:class:`damformer.runtime.artifacts.RunFolder`);
the tracker then logs these files, it never runs the model itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damformer.atomic import atomic_write_bytes
from damformer.data.classes import FLAIR_CLASSES
from damformer.errors import DamformerError
from damformer.eval.evaluate import eval_mode
from damformer.eval.figures import confusion_png, mosaic_png
from damformer.eval.metrics import SegmentationScores
from damformer.loading.loader import LoaderOptions, ShardLoader
from damformer.models.damformer import predict_logits
from damformer.runtime.artifacts import RunFolder
from damformer.shards.shardset import ShardSet

CONFUSION_PNG = "confusion_matrix.png"
MOSAIC_PNG = "prediction_mosaic.png"


def write_scores(
    folder: RunFolder,
    scores: SegmentationScores,
    *,
    iteration: int,
    seed: int,
    validation: SegmentationScores | None = None,
) -> Path:
    """scores.json: the target test scores, and under "validation" those of ``data.target_val``."""
    payload = scores.to_json(iteration=iteration, seed=seed)
    if validation is not None:
        payload["validation"] = {k: v for k, v in validation.to_json().items() if k != "confusion_matrix"}
    atomic_write_bytes(folder.scores, json.dumps(payload).encode())
    return folder.scores


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
    """The confusion matrix (PNG, and PDF/SVG for papers) and a mosaic of the first target test patches.

    ``title``: the run (model, inputs, source->target) and its mIoU, on both figures.
    """
    classes = FLAIR_CLASSES[: scores.matrix.shape[0]]
    written = list(
        confusion_png(scores.matrix, classes, output_dir / CONFUSION_PNG, title=title, vector=True)
    )
    if patches < 1:
        return written
    loader = ShardLoader(
        test_set, LoaderOptions(batch_size=patches, augment=False, pad=False, shuffle_buffer=1)
    )
    batch: dict[str, Any] = next(iter(loader))
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with eval_mode(model), autocast():
        prediction = predict_logits(model, batch).argmax(dim=1).cpu().numpy()
    labels = batch.get("label")
    rows = [
        (_rgb(batch["aerial"][i]), labels[i].cpu().numpy() if labels is not None else None, prediction[i])
        for i in range(prediction.shape[0])
    ]
    titles = None
    if "keys" in batch:  # the patch and its domain (FLAIR-2 domains differ: say which one it is)
        domains = _domains(test_set, list(batch["keys"]))
        titles = [f"{key} ({domains.get(str(key), '?')})" for key in batch["keys"]]
    pixel_m = _pixel_size(test_set)
    written.append(
        mosaic_png(rows, classes, output_dir / MOSAIC_PNG, titles=titles, heading=title, pixel_m=pixel_m)
    )
    return written


def _domains(test_set: ShardSet, keys: list[str]) -> dict[str, str]:
    """The domain of each sample key (from the shard set's manifests)."""
    return {
        key: info["domain"]
        for manifest in test_set.manifests
        for key, info in manifest["samples"].items()
        if key in set(keys)
    }


def _pixel_size(test_set: ShardSet) -> float | None:
    """The aerial pixel size in metres (the first sample's geotransform), for scale bars."""
    try:
        return abs(float(test_set.first_sample().transform.a))
    except (DamformerError, OSError):  # a figure without a scale bar rather than none
        return None
