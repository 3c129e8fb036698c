"""The EMA teacher and its pseudo-labels (method.md sections 4-5).

The teacher starts as a copy of the student and follows it by an exponential moving average whose
rate ramps up: ``alpha_t = min(1 - 1 / (t + 1), alpha)``. Dropout and drop-path are always off. Its
BatchNorm layers normalise with the statistics of the batch they label (``norm="batch"``, DAFormer's
teacher: the un-augmented target batch, an AdaBN-like correction of radiometric shift) and keep their
own running statistics of it, or use the student's running statistics (``norm="running"``). It is part
of every checkpoint.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

PseudoWeightMode = Literal["batch", "image", "pixel"]
TeacherNorm = Literal["batch", "running"]


class EMATeacher(nn.Module):
    """A frozen copy of the student updated by exponential moving average.

    Args:
        student: the network being trained (copied once here).
        alpha: the largest averaging factor (0.999).
        norm: BatchNorm statistics of the teacher's forward: ``batch`` (DAFormer) or ``running``.
    """

    def __init__(self, student: nn.Module, *, alpha: float = 0.999, norm: TeacherNorm = "batch") -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"uda.ema_alpha: expected 0 <= alpha < 1, found {alpha}")
        if norm not in ("batch", "running"):
            raise ValueError(f"uda.teacher_norm: expected batch or running, found {norm!r}")
        self.alpha = alpha
        self.norm = norm
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.train(True)

    def train(self, mode: bool = True) -> EMATeacher:
        """Dropout and drop-path stay off; BatchNorm follows ``norm`` while training, eval otherwise."""
        super().train(mode)
        self.model.eval()
        if mode and self.norm == "batch":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        return self

    def rate(self, iteration: int) -> float:
        """The averaging factor at ``iteration`` (0-based): 0 at the start, then up to ``alpha``."""
        return min(1.0 - 1.0 / (iteration + 1), self.alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> None:
        """Set teacher = a * teacher + (1 - a) * student, for parameters.

        With ``norm="running"`` the buffers (BatchNorm statistics) are copied from the student: its
        running averages are already smoothed. With ``norm="batch"`` the teacher keeps its own.
        """
        rate = self.rate(iteration)
        student = getattr(student, "module", student)  # DDP / DeepSpeed wrappers
        mine = list(self.model.parameters())
        theirs = [p.detach() for p in student.parameters()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA teacher: {len(mine)} parameters, the student {len(theirs)}")
        # two multi-tensor kernels for all parameters instead of two small kernels per parameter
        torch._foreach_mul_(mine, rate)
        torch._foreach_add_(mine, theirs, alpha=1.0 - rate)
        if self.norm == "running":
            torch._foreach_copy_(list(self.model.buffers()), list(student.buffers()))

    def compile_forward(self, backend: str = "inductor") -> None:
        """Run the teacher's forward through ``torch.compile`` (its weights change in place: no recompile)."""
        compiled = torch.compile(self.model, backend=backend)
        object.__setattr__(self, "_forward", compiled)  # not a submodule: the state_dict stays the same

    def forward(self, *args: torch.Tensor) -> dict:  # noqa: D102
        forward = self.__dict__.get("_forward")
        return forward(*args) if forward is not None else self.model(*args)


EnsembleForm = Literal["released", "normalised"]


def ensemble_probabilities(
    hr_logits: torch.Tensor,
    lr_logits: torch.Tensor | None,
    *,
    lr_weight: float = 0.2,
    form: EnsembleForm = "released",
) -> torch.Tensor:
    """DAM-Former's ensemble pseudo-label scores from the teacher's HR and LR logits (B, K, H, W).

    Both forms have the same argmax (the label); they differ in the confidence, the maximum over
    classes that :func:`pseudo_labels` compares with the threshold:

    * ``released`` (the authors' code, the default): ``softmax(HR) + w softmax(LR)``, not normalised,
      so the confidence lies in [0, 1 + w]. A pixel the HR branch is sure of (p_HR >= 0.968) always
      passes 0.968, and the LR branch can lift an unsure one over it;
    * ``normalised``: ``(1 - w) softmax(HR) + w softmax(LR)``, a probability. With w = 0.2 and the
      threshold 0.968 a pixel passes only if p_LR >= 0.84 even when p_HR = 1: pseudo-labels then
      collapse while the 10 m branch is unsure. It needs a lower ``uda.pseudo_threshold``.

    Without LR logits (or w = 0) both are softmax(HR).
    """
    if form not in ("released", "normalised"):
        raise ValueError(f"uda.ensemble: expected released or normalised, found {form!r}")
    probs = torch.softmax(hr_logits.float(), dim=1)
    if lr_logits is None or lr_weight == 0:
        return probs
    lr_probs = torch.softmax(lr_logits.float(), dim=1)
    if form == "normalised":
        return (1.0 - lr_weight) * probs + lr_weight * lr_probs
    return probs + lr_weight * lr_probs


def pseudo_labels(
    probs_bkhw: torch.Tensor, *, threshold: float = 0.968, mode: PseudoWeightMode = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard labels and their confidence weights from class probabilities.

    ``probs_bkhw``: class scores, e.g. :func:`ensemble_probabilities` (in its released form they may
    sum to more than 1: the confidence is still their maximum).

    Returns:
        ``labels`` (B, H, W) int64 (argmax) and ``weight`` (B, H, W) float: the fraction of confident
        pixels (max score >= ``threshold``) of the whole batch (``batch``, DAFormer), of each
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
