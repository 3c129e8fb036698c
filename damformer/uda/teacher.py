"""The EMA teacher and its pseudo-labels (method.md sections 4-5).

The teacher starts as a copy of the student and follows it by an exponential moving average whose
rate ramps up: ``alpha_t = min(1 - 1 / (t + 1), alpha)``. It always runs in eval mode (no dropout, no
drop-path, BatchNorm with running statistics), and is part of every checkpoint.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

PseudoWeightMode = Literal["batch", "image", "pixel"]


class EMATeacher(nn.Module):
    """A frozen, eval-mode copy of the student updated by exponential moving average.

    Args:
        student: the network being trained (copied once here).
        alpha: the largest averaging factor (0.999).
    """

    def __init__(self, student: nn.Module, *, alpha: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"uda.ema_alpha: expected 0 <= alpha < 1, found {alpha}")
        self.alpha = alpha
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher stays in eval mode whatever its parent does."""
        super().train(mode)
        self.model.eval()
        return self

    def rate(self, iteration: int) -> float:
        """The averaging factor at ``iteration`` (0-based): 0 at the start, then up to ``alpha``."""
        return min(1.0 - 1.0 / (iteration + 1), self.alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> None:
        """Set teacher = a * teacher + (1 - a) * student, for parameters.

        Buffers (BatchNorm statistics) are copied from the student: its running averages are already
        smoothed.
        """
        rate = self.rate(iteration)
        student = getattr(student, "module", student)  # DDP / DeepSpeed wrappers
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.mul_(rate).add_(theirs.detach(), alpha=1.0 - rate)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)

    def forward(self, *args: torch.Tensor) -> dict:  # noqa: D102
        return self.model(*args)


def ensemble_probabilities(
    hr_logits: torch.Tensor, lr_logits: torch.Tensor | None, *, lr_weight: float = 0.2
) -> torch.Tensor:
    """(1 - w) softmax(HR) + w softmax(LR): DAM-Former's ensemble pseudo-label (HR only without LR)."""
    probs = torch.softmax(hr_logits.float(), dim=1)
    if lr_logits is None or lr_weight == 0:
        return probs
    return (1.0 - lr_weight) * probs + lr_weight * torch.softmax(lr_logits.float(), dim=1)


def pseudo_labels(
    probs_bkhw: torch.Tensor, *, threshold: float = 0.968, mode: PseudoWeightMode = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard labels and their confidence weights from class probabilities.

    Returns:
        ``labels`` (B, H, W) int64 (argmax) and ``weight`` (B, H, W) float: the fraction of confident
        pixels (max probability >= ``threshold``) of the whole batch (``batch``, DAFormer), of each
        image (``image``), or 1/0 per pixel (``pixel``).
    """
    confidence, labels = probs_bkhw.max(dim=1)
    confident = (confidence >= threshold).float()
    if mode == "batch":
        weight = confident.mean().expand_as(confident)
    elif mode == "image":
        weight = confident.mean(dim=(1, 2), keepdim=True).expand_as(confident)
    elif mode == "pixel":
        weight = confident
    else:
        raise ValueError(f"uda.pseudo_weight: expected batch, image or pixel, found {mode!r}")
    return labels, weight.contiguous()
