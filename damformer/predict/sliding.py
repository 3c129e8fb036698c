"""Class probabilities for patches and for large rasters (sliding windows with overlap and blending).

A window's prediction is weighted by a ramp that is 1 in its middle and falls towards its edges, so
where windows overlap the pixel is decided mostly by the window that sees it with the most context,
and the seams between windows disappear. With ``stride == window`` the windows tile the raster and
each pixel comes from exactly one window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from damformer.models.damformer import model_inputs

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
        total = None
        for dims in self.flips:
            flipped = dict(moved)
            if dims:
                flipped["aerial"] = moved["aerial"].flip(dims)
                if "s2" in moved:
                    flipped["s2"] = moved["s2"].flip(dims)
            with self.autocast():
                logits = self.model(*model_inputs(flipped))["hr"]
            probs = torch.softmax(logits.float(), dim=1)
            if dims:
                probs = probs.flip(dims)
            total = probs if total is None else total + probs
        assert total is not None
        return (total / len(self.flips)).cpu()


def blend_weights(window: int) -> np.ndarray:
    """(window, window) weights: 1 in the central half, falling linearly to a small value at the edges."""
    ramp = np.minimum(np.arange(window) + 0.5, window - np.arange(window) - 0.5) / (window / 4)
    ramp = np.clip(ramp, 0.05, 1.0).astype(np.float32)  # never 0: an edge pixel seen once still counts
    return np.outer(ramp, ramp)


def window_origins(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners covering the raster; the last row/column of windows is aligned to its end."""

    def axis(size: int) -> list[int]:
        if size <= window:
            return [0]
        starts = list(range(0, size - window + 1, stride))
        if starts[-1] != size - window:
            starts.append(size - window)
        return starts

    return [(row, col) for row in axis(height) for col in axis(width)]


def sliding_probabilities(
    aerial: np.ndarray,
    predict: Callable[[Batch], torch.Tensor],
    *,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int = 4,
    temporal: Callable[[int, int, int], dict[str, np.ndarray]] | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> np.ndarray:
    """(K, H, W) blended class probabilities of a (C, H, W) uint8 raster.

    Args:
        aerial: the raster's bands (a raster smaller than ``window`` is padded with zeros).
        predict: batch -> (B, K, window, window) probabilities (a :class:`PatchPredictor`).
        num_classes: K.
        window: window side in pixels (the model's training patch size is a good choice).
        stride: step between windows (stride < window: overlap, blended).
        batch_size: windows per forward pass.
        temporal: (row, col, window) -> ``{"s2": (T, 10, S, S), "s2_day_offsets": (T,)}`` for +T models.
        progress: wraps the batch iterator (a progress bar).
    """
    bands, height, width = aerial.shape
    if stride < 1 or stride > window:
        raise ValueError(f"stride must be in 1..window ({window}), found {stride}")
    padded_h, padded_w = max(height, window), max(width, window)
    if (padded_h, padded_w) != (height, width):
        canvas = np.zeros((bands, padded_h, padded_w), dtype=aerial.dtype)
        canvas[:, :height, :width] = aerial
        aerial = canvas
    origins = window_origins(padded_h, padded_w, window, stride)
    weights = blend_weights(window) if stride < window else np.ones((window, window), np.float32)
    total = np.zeros((num_classes, padded_h, padded_w), dtype=np.float32)
    weight_sum = np.zeros((padded_h, padded_w), dtype=np.float32)
    chunks = [origins[i : i + batch_size] for i in range(0, len(origins), batch_size)]
    for chunk in progress(iter(chunks)) if progress else chunks:
        batch: Batch = {
            "aerial": torch.from_numpy(
                np.stack([aerial[:, r : r + window, c : c + window] for r, c in chunk])
            )
        }
        if temporal is not None:
            from damformer.data.collate import collate_samples

            series = [temporal(r, c, window) for r, c in chunk]
            stacked = collate_samples(
                [{"key": "", "domain": "", "valid": True, "aerial": batch["aerial"][i].numpy(), "label": None,
                  **s} for i, s in enumerate(series)]
            )  # fmt: skip
            batch.update({k: stacked[k] for k in ("s2", "s2_mask", "s2_day_offsets")})
        probs = predict(batch).numpy()
        for (row, col), window_probs in zip(chunk, probs, strict=True):
            total[:, row : row + window, col : col + window] += window_probs * weights
            weight_sum[row : row + window, col : col + window] += weights
    return (total / weight_sum)[:, :height, :width]
