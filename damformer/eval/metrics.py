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
    """Accumulates a (classes x classes) matrix: rows are labels, columns predictions."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of (B, H, W) predictions and labels (any integer dtype, any device)."""
        labels = labels.reshape(-1).long().cpu()
        predictions = predictions.reshape(-1).long().cpu()
        keep = labels != self.ignore_index
        if (labels[keep] >= self.num_classes).any() or (labels[keep] < 0).any():
            raise ValueError(f"labels: expected 0..{self.num_classes - 1} or {self.ignore_index}")
        index = labels[keep] * self.num_classes + predictions[keep]
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def merge(self, other: torch.Tensor) -> None:
        """Add another matrix (e.g. summed over ranks)."""
        self.matrix += other.to(self.matrix)


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
