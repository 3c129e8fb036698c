"""One self-training step (DACS as in DAFormer, with DAM-Former's mixed loss and ensemble pseudo-labels).

Order per iteration (method.md section 5):

1. source forward, supervised loss (HR + LR cross-entropy, "mixed loss"), optional ImageNet feature
   distance, backward;
2. teacher forward on the un-augmented target with the target's own Sentinel-2 series; ensemble
   pseudo-labels (HR and LR probabilities) and their confidence weight;
3. ClassMix per image: half of each source image's classes pasted onto a target image; mixed labels =
   source labels inside, pseudo-labels outside; weights 1 inside, the confidence weight outside;
   strong photometric augmentation of the mixed images; the mixed sample keeps the **target's**
   Sentinel-2 series (its background is the target patch); mixed loss, backward. The LR term of that
   loss supervises the target's own pixels only: the pasted source pixels have no series there;
4. optional MIC: masked target, pseudo-labelled by the teacher, backward.

The caller then steps the optimiser and calls :meth:`SelfTraining.update_teacher`. Backward goes
through a callable so a DDP or DeepSpeed wrapper can own it; this module imports no distributed code.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from damformer.models.damformer import AERIAL_MEAN, model_inputs
from damformer.uda.mixing import IGNORE_INDEX, StrongAugment, classmix_masks, mix
from damformer.uda.teacher import EMATeacher, ensemble_probabilities, pseudo_labels

Batch = dict[str, Any]
Backward = Callable[[torch.Tensor], None]


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel cross-entropy (ignore index 255), times an optional pixel weight, averaged over pixels.

    Without ``valid`` the mean runs over all pixels (DAFormer). With a (B, H, W) bool ``valid`` it runs
    over the valid pixels only: the loss of a region alone, as if the rest of the image were not there.
    """
    loss = F.cross_entropy(logits.float(), labels.long(), reduction="none", ignore_index=IGNORE_INDEX)
    if weight is not None:
        loss = loss * weight
    if valid is None:
        return loss.mean()
    valid = valid.to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss, 1 - mean_c 2 |P_c Y_c| / (|P_c| + |Y_c|), over the classes in the labels.

    Pixels with the ignore index or zero weight are excluded.
    """
    probs = torch.softmax(logits.float(), dim=1)
    valid = (labels != IGNORE_INDEX).float()
    if weight is not None:
        valid = valid * weight
    onehot = (
        F.one_hot(labels.long().clamp_max(logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
    )
    pixel = valid[:, None]
    intersection = (probs * onehot * pixel).sum(dim=(0, 2, 3))
    truth = (onehot * pixel).sum(dim=(0, 2, 3))
    sizes = (probs * pixel).sum(dim=(0, 2, 3)) + truth
    present = (truth > 0).float()  # soft predictions give every class some mass: average over labelled ones
    dice = 2.0 * intersection / sizes.clamp_min(1e-6)
    # a masked mean, not an indexed one: no host synchronisation; 0 (keeping the graph) without labels
    return (present * (1.0 - dice)).sum() / present.sum().clamp_min(1.0)


class SelfTraining(nn.Module):
    """Student, EMA teacher and the UDA losses.

    The teacher and the frozen encoder are submodules, so ``state_dict`` carries them into checkpoints.

    Args:
        student: the network being trained (maybe wrapped later; pass the bare module here).
        config: a :class:`damformer.config.UDAConfig`.
        seed: seed of the ClassMix, augmentation and MIC draws.
    """

    def __init__(self, student: nn.Module, config: Any, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.student = student
        self.teacher = None
        if config.enabled:
            self.teacher = EMATeacher(student, alpha=config.ema_alpha, norm=config.teacher_norm)
        self.augment = StrongAugment() if config.strong_augment else None
        self.imagenet = None
        if config.enabled and config.feature_distance:
            # the encoder as loaded (ImageNet weights), frozen: features to stay close to on "thing" classes
            self.imagenet = copy.deepcopy(student).requires_grad_(False).eval()
            self.imagenet.decoder = nn.Identity()  # only its encoder (and band adapter) is ever run
            self.imagenet.temporal = self.imagenet.fusion = self.imagenet.lr_head = None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # moved with the data: to_device()
        # Set by the engine: the student's forward wrapper (DDP) and the autocast context (AMP). Plain
        # attributes, not submodules, so checkpoints keep the bare ``student.*`` keys.
        self.use_student_forward(student)
        self.autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def compile(self, backend: str = "inductor") -> None:
        """``torch.compile`` the student's forward (as wrapped, e.g. by DDP) and the teacher's."""
        self.use_student_forward(torch.compile(self.student_forward, backend=backend))
        if self.teacher is not None:
            self.teacher.compile_forward(backend)

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether a backward may leave some of the student's parameters without a gradient.

        An LR head that no loss trains (``lr_weight`` 0, the row without the mixed loss) gets none. Every
        other parameter gets one in every backward (MIC's loss touches the LR head with a zero weight),
        which data-parallel wrappers (DDP) rely on unless told otherwise.
        """
        return getattr(self.student, "lr_head", None) is not None and self.config.lr_weight == 0

    def use_student_forward(self, module: nn.Module) -> None:
        """Run the student's forward passes through ``module`` (the student itself, or its DDP wrapper)."""
        object.__setattr__(self, "student_forward", module)  # bypasses submodule registration

    # -- losses ------------------------------------------------------------------------------------

    def supervised_loss(
        self,
        out: dict[str, Any],
        labels: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        lr_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixed loss: HR cross-entropy, plus the LR branch's when the model has one.

        ``lr_valid`` (B, H, W) bool: the pixels the LR term may supervise (None: all). In the ClassMix
        batch these are the target's own pixels: the pasted source pixels have no Sentinel-2 series of
        their own (the batch carries the target's), so their labels say nothing about that series.
        """
        loss = self.config.hr_weight * weighted_cross_entropy(out["hr"], labels, weight)
        if self.config.region_loss == "dice":
            loss = loss + self.config.region_weight * dice_loss(out["hr"], labels, weight)
        if out.get("lr") is not None and self.config.lr_weight > 0:
            lr_loss = weighted_cross_entropy(out["lr"], labels, weight, valid=lr_valid)
            loss = loss + self.config.lr_weight * lr_loss
        return loss

    def feature_distance(self, source: Batch, features: list[torch.Tensor]) -> torch.Tensor:
        """L2 distance to the frozen ImageNet encoder on cells mostly (>= 75%) of the configured classes."""
        if self.imagenet is None:
            raise RuntimeError("feature distance needs uda.feature_distance (the frozen ImageNet encoder)")
        with torch.no_grad():
            x = self.imagenet.normalise_aerial(source["aerial"])
            if self.imagenet.adapter is not None:
                x = self.imagenet.adapter(x)
            reference = self.imagenet.encoder(x)[-1]
        student = features[-1]
        labels = source["label"].long()
        things = torch.zeros_like(labels, dtype=torch.float32)
        for cls in self.config.fd_classes:
            things += (labels == cls).float()
        purity = F.adaptive_avg_pool2d(things[:, None], student.shape[-2:])[:, 0]
        cells = (purity >= 0.75).float()
        distance = torch.norm(student - reference, dim=1)
        # masked mean (no host synchronisation); 0 without such cells, keeping the graph for DDP
        return self.config.fd_lambda * (distance * cells).sum() / cells.sum().clamp_min(1.0)

    # -- the step ----------------------------------------------------------------------------------

    def to_device(self, device: torch.device) -> SelfTraining:
        """Move the modules and the random generator (its draws happen where the data is)."""
        self.to(device)
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self

    def forward_backward(
        self, source: Batch, target: Batch | None, *, backward: Backward | None = None, scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Compute and back-propagate every loss of one (micro-)step.

        Returns the metrics as detached 0-d tensors on the device: reading them would wait for the device,
        so the engine reads them once per log interval, not here.
        """
        backward = backward or (lambda loss: loss.backward())
        metrics: dict[str, torch.Tensor] = {}
        with self.autocast():
            out = self.student_forward(*model_inputs(source))
            loss = self.supervised_loss(out, source["label"])
            metrics["loss_source"] = loss.detach()
            if self.imagenet is not None:
                distance = self.feature_distance(source, out["features"])
                metrics["loss_feature_distance"] = distance.detach()
                loss = loss + distance
        backward(loss * scale)
        del out
        if self.teacher is None or target is None:
            return metrics

        with torch.no_grad(), self.autocast():
            teacher_out = self.teacher(*model_inputs(target))  # the target with its own S2 series
            probs = ensemble_probabilities(
                teacher_out["hr"],
                teacher_out["lr"],
                lr_weight=self.config.ensemble_lr_weight,
                form=self.config.ensemble,
            )
            labels, weight = pseudo_labels(
                probs, threshold=self.config.pseudo_threshold, mode=self.config.pseudo_weight
            )
        metrics["pseudo_confidence"] = weight.mean()

        source_labels = source["label"].long()
        if self.config.classmix:
            masks = classmix_masks(source_labels, self.generator)
        else:
            masks = torch.zeros_like(source_labels, dtype=torch.bool)
        mixed = dict(target)
        mixed_aerial = mix(masks, source["aerial"].float(), target["aerial"].float())
        if self.augment is not None:
            mixed_aerial = self.augment(mixed_aerial, self.generator)
        mixed["aerial"] = mixed_aerial
        mixed_labels = mix(masks, source_labels, labels)
        mixed_weight = mix(masks, torch.ones_like(weight), weight)
        with self.autocast():
            mixed_out = self.student_forward(*model_inputs(mixed))
            mixed_loss = self.supervised_loss(mixed_out, mixed_labels, mixed_weight, lr_valid=~masks)
        metrics["loss_mixed"] = mixed_loss.detach()
        backward(mixed_loss * scale)
        del mixed_out

        if self.config.mic:
            masked = dict(target)
            masked["aerial"] = self._mask_blocks(target["aerial"].float())
            with self.autocast():
                mic_out = self.student_forward(*model_inputs(masked))
                mic_loss = self.config.mic_weight * weighted_cross_entropy(mic_out["hr"], labels, weight)
                if mic_out.get("lr") is not None and self.config.lr_weight > 0:
                    # a zero gradient for the LR head: every backward reaches every trained parameter
                    mic_loss = mic_loss + 0.0 * mic_out["lr"].sum()
            metrics["loss_mic"] = mic_loss.detach()
            backward(mic_loss * scale)
        return metrics

    def _mask_blocks(self, aerial: torch.Tensor) -> torch.Tensor:
        """MIC: hide ``mic_ratio`` of the ``mic_block``-pixel blocks (band means: 0 once normalised).

        At least one block of every image stays visible: a fully hidden image is constant, all zero once
        normalised, and near initialisation (zero biases) every activation is then zero, so each
        LayerNorm's backward multiplies the gradient by 1 / sqrt(eps) until it overflows. (With 512 px
        crops, 256 blocks, that never happens in practice; with the small crops of tests it did.)
        """
        batch, bands, height, width = aerial.shape
        block = self.config.mic_block
        grid = (-(-height // block), -(-width // block))
        draws = torch.rand(batch, 1, *grid, generator=self.generator, device=aerial.device)
        keep = draws >= self.config.mic_ratio
        best = draws == draws.amax(dim=(2, 3), keepdim=True)  # the highest draw: kept when all are hidden
        keep = keep | (best & ~keep.flatten(1).any(dim=1)[:, None, None, None])
        keep = keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :height, :width]
        fill = torch.tensor(AERIAL_MEAN[:bands], device=aerial.device)[None, :, None, None]
        return torch.where(keep, aerial, fill)

    @torch.no_grad()
    def update_teacher(self, iteration: int) -> None:
        """EMA step of the teacher after the optimiser step of ``iteration``."""
        if self.teacher is not None:
            self.teacher.update(self.student, iteration)
