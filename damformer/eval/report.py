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
        prediction = predict_logits(model, batch).argmax(dim=1).cpu().numpy()
    labels = batch.get("label")
    rows = [
        (_rgb(batch["aerial"][i]), labels[i].cpu().numpy() if labels is not None else None, prediction[i])
        for i in range(prediction.shape[0])
    ]
    titles = [str(key) for key in batch["keys"]] if "keys" in batch else None
    written.append(mosaic_png(rows, classes, output_dir / MOSAIC_PNG, titles=titles))
    return written
