"""AdamW with DAFormer's parameter groups, and the warmup + poly learning-rate schedule (method.md 6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Which parameters take optim.head_lr_mult (optim.head_lr_scope): "heads", every randomly initialised
# head (ours); "classifier", the HR decoder's last conv only: in the authors' release the U-Net sits inside
# the backbone and mmseg's "head" key matches only its segmentation_head.
HEAD_PREFIXES = {"heads": ("decoder.", "lr_head."), "classifier": ("decoder.classifier.",)}
TEMPORAL_PREFIXES = ("temporal.", "fusion.")  # U-TAE and DTF: randomly initialised too


def _lr_mult(name: str, head_lr_mult: float, temporal_lr_mult: float, head_scope: str) -> float:
    if name.startswith(HEAD_PREFIXES[head_scope]):
        return head_lr_mult
    if name.startswith(TEMPORAL_PREFIXES):
        return temporal_lr_mult
    return 1.0


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head_lr_mult: float,
    temporal_lr_mult: float = 1.0,
    head_scope: str = "heads",
) -> list[dict]:
    """Groups by learning-rate factor (encoder 1, heads, temporal branch) x {decayed, not decayed}.

    Norms, biases and other 1-d parameters get no weight decay.
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    no_decay_names = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(
            module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm1d | nn.BatchNorm2d | nn.SyncBatchNorm
        )
        for name, _ in module.named_parameters(recurse=False)
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        mult = _lr_mult(name, head_lr_mult, temporal_lr_mult, head_scope)
        decay = not (name in no_decay_names or name.endswith(".bias") or parameter.dim() == 1)
        groups.setdefault((mult, decay), []).append(parameter)
    return [
        {
            "params": params,
            "lr": lr * mult,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_mult": mult,
        }
        for (mult, decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = 6e-5,
    weight_decay: float = 0.01,
    head_lr_mult: float = 10.0,
    temporal_lr_mult: float = 10.0,
    head_scope: str = "heads",
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (``fused``: one CUDA kernel per step for all parameters)."""
    groups = parameter_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        head_lr_mult=head_lr_mult,
        temporal_lr_mult=temporal_lr_mult,
        head_scope=head_scope,
    )
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_factor(
    iteration: int, *, warmup: int, max_iters: int, warmup_ratio: float = 1e-6, power: float = 1.0
) -> float:
    """Learning-rate factor at ``iteration``: poly decay to 0 at ``max_iters``, linear warmup before.

    During warmup the poly factor is scaled by ``1 - (1 - i / warmup) (1 - warmup_ratio)`` (mmcv's
    linear warmup), so it rises from ``warmup_ratio`` to the poly curve at the end of warmup.
    """
    poly = (1.0 - min(iteration, max_iters) / max_iters) ** power
    if iteration < warmup:
        return poly * (1.0 - (1.0 - iteration / warmup) * (1.0 - warmup_ratio))
    return poly


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Apply ``base_lr * factor * group lr_mult`` to every group."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_mult", 1.0)


def trainable(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters that need gradients."""
    return [p for p in parameters if p.requires_grad]
