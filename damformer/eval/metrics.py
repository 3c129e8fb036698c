"""Confusion matrix and IoU metrics, accumulated over a whole evaluation set (method.md section 6).

Intersection and union are summed over all pixels of the set before dividing (not averaged per image).
The ignore index is excluded. A class absent from both predictions and labels has IoU NaN and is left
out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a (classes x classes) matrix (rows: labels, columns: predictions) on the batches' device.

    Nothing is copied to the host per batch: an out-of-range label is counted in a spare bin and
    reported once, when the matrix is read (:attr:`matrix`).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._counts: torch.Tensor | None = None  # (classes^2 + 1,): the last bin holds bad labels

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of (B, H, W) predictions and labels (any integer dtype, any device)."""
        k = self.num_classes
        labels = labels.reshape(-1).long()
        predictions = predictions.reshape(-1).long().to(labels.device)
        keep = labels != self.ignore_index
        valid = keep & (labels >= 0) & (labels < k)
        index = torch.where(valid, labels * k + predictions, k * k)  # bad labels: the spare bin
        counts = torch.bincount(index[keep], minlength=k * k + 1)
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    @property
    def matrix(self) -> torch.Tensor:
        """The (classes, classes) int64 matrix, on the device of the batches.

        Raises:
            ValueError: a label outside 0..classes - 1 (other than the ignore index) was seen.
        """
        k = self.num_classes
        if self._counts is None:
            return torch.zeros(k, k, dtype=torch.int64)
        if int(self._counts[k * k]):  # read once, when the scores are computed
            raise ValueError(f"labels: expected 0..{k - 1} or {self.ignore_index}")
        return self._counts[: k * k].reshape(k, k)


@dataclass(frozen=True)
class SegmentationScores:
    """IoU per class (NaN when a class is absent from labels and predictions), their mean, accuracy.

    ``miou`` averages every class (13 for FLAIR-2); :attr:`miou_without_other` drops the last class,
    "other", as FLAIR-2's baseline and its challenge report (12 classes). Pixels of "other" still count
    in the other classes' false positives and negatives: only its own IoU leaves the mean.
    """

    iou: tuple[float, ...]
    miou: float
    accuracy: float
    matrix: np.ndarray

    @property
    def miou_without_other(self) -> float:
        """Mean IoU over every class but the last ("other" in FLAIR-2's 13-class setting)."""
        kept = np.asarray(self.iou[:-1], dtype=np.float64)
        return float(np.nanmean(kept)) if np.isfinite(kept).any() else float("nan")

    def table(self, class_names: Sequence[str]) -> str:
        """A plain-text table of the per-class IoU, the two mIoU conventions and the accuracy."""
        lines = [f"{'class':<22}{'IoU':>8}"]
        for name, value in zip(class_names, self.iou, strict=True):
            lines.append(f"{name:<22}{'n/a' if np.isnan(value) else f'{100 * value:.2f}':>8}")
        count = len(self.iou)
        lines.append(f"{f'mIoU ({count} classes)':<22}{100 * self.miou:>8.2f}")
        lines.append(f"{f'mIoU ({count - 1}, no other)':<22}{100 * self.miou_without_other:>8.2f}")
        lines.append(f"{'overall accuracy':<22}{100 * self.accuracy:>8.2f}")
        return "\n".join(lines)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """What ``scores.json`` holds: the mIoUs, accuracy, IoU per class and the confusion matrix."""
        return {
            **extra,
            "miou": self.miou,
            "miou_without_other": self.miou_without_other,
            "accuracy": self.accuracy,
            "iou": list(self.iou),
            "confusion_matrix": self.matrix.tolist(),
        }


def scores(matrix: torch.Tensor | np.ndarray) -> SegmentationScores:
    """IoU = TP / (TP + FP + FN) per class from a confusion matrix."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(axis=0) + m.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = m.sum()
    return SegmentationScores(
        iou=tuple(float(v) for v in iou),
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        accuracy=float(tp.sum() / total) if total else float("nan"),
        matrix=m.astype(np.int64),
    )
