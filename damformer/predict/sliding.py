"""Class probabilities of a model for collated batches (patches or windows), with flip TTA.

Large rasters are swept window by window in :mod:`damformer.predict.streaming`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from damformer.models.damformer import predict_logits

Batch = dict[str, Any]


class PatchPredictor:
    """Softmax probabilities of a model for collated batches, with optional flip test-time augmentation.

    Args:
        model: the network (eval mode is set here).
        device: where to run it.
        autocast: AMP context (``torch.autocast``) or a null context.
        flips: average over identity, horizontal, vertical and both flips (aerial and Sentinel-2
            crops flipped alike, predictions flipped back).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        flips: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.autocast = autocast
        self.flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if flips else [()]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """(B, K, H, W) float32 probabilities on the CPU."""
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        total = torch.zeros(())
        for dims in self.flips:
            flipped = dict(moved)
            if dims:
                flipped["aerial"] = moved["aerial"].flip(dims)
                if "s2" in moved:
                    flipped["s2"] = moved["s2"].flip(dims)
            with self.autocast():
                logits = predict_logits(self.model, flipped)
            probs = torch.softmax(logits.float(), dim=1)
            if dims:
                probs = probs.flip(dims)
            total = total + probs
        return (total / len(self.flips)).cpu()
