"""Blended sliding-window probabilities of a raster of any size, in bounded memory.

The raster is cut into vertical bands (``band_width`` columns); each band is swept from top to bottom.
A band accumulates every window that overlaps it (windows straddling two bands are predicted for
each: about window / band_width more work), and hands out its rows as soon as no later window can
touch them, ``row_block`` rows at a time (whole tile rows of the output GeoTIFF). Memory is about
(classes + 1) x (window + row_block) x (band_width + 2 window) floats, whatever the raster's size.

Per pixel the windows are added in the same row-major order as a blend of the whole raster in memory,
with the same weights, so the result is bitwise the same (for the same window predictions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Batch = dict[str, Any]
ReadWindow = Callable[[int, int, int, int], np.ndarray]  # (row, col, height, width) -> (C, h, w) uint8
Temporal = Callable[[int, int, int], dict[str, np.ndarray]]  # (row, col, window) -> s2, s2_day_offsets


def blend_weights(window: int) -> np.ndarray:
    """(window, window) weights: 1 in the central half, falling linearly to a small value at the edges."""
    ramp = np.minimum(np.arange(window) + 0.5, window - np.arange(window) - 0.5) / (window / 4)
    ramp = np.clip(ramp, 0.05, 1.0).astype(np.float32)  # never 0: an edge pixel seen once still counts
    return np.outer(ramp, ramp)


def window_axis(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis; the last window is aligned to the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@dataclass(frozen=True)
class Block:
    """Finished rows of one band: probabilities (K, h, w) at (row, col) of the raster."""

    row: int
    col: int
    probabilities: np.ndarray


@dataclass(frozen=True)
class SweepOptions:
    """Window geometry and the bounds on memory.

    Attributes:
        window: window side (pixels); stride: step between windows (stride < window: blended overlap).
        batch_size: windows per forward pass.
        band_width: columns swept at once (memory); row_block: rows handed out at once (tile rows).
    """

    window: int
    stride: int
    batch_size: int = 4
    band_width: int = 2048
    row_block: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"stride must be in 1..window ({self.window}), found {self.stride}")


def sweep(
    read_window: ReadWindow,
    height: int,
    width: int,
    predict: Callable[[Batch], torch.Tensor],
    *,
    num_classes: int,
    options: SweepOptions,
    temporal: Temporal | None = None,
    on_batch: Callable[[], None] | None = None,
) -> Iterator[Block]:
    """Yield the blended probabilities of a ``height`` x ``width`` raster, block by block.

    ``read_window`` reads any rectangle of the raster inside its bounds; a raster smaller than the window
    is padded with zeros, as windows at its edge would be. Blocks come band by band, top to bottom.
    """
    window, stride = options.window, options.stride
    padded_h, padded_w = max(height, window), max(width, window)
    rows, cols = window_axis(padded_h, window, stride), window_axis(padded_w, window, stride)
    weights = blend_weights(window) if stride < window else np.ones((window, window), np.float32)
    for core_start in range(0, width, options.band_width):
        core_end = min(core_start + options.band_width, width)
        band_cols = [c for c in cols if c < core_end and c + window > core_start]
        left, right = band_cols[0], band_cols[-1] + window
        buffer_rows = window + options.row_block
        total = np.zeros((num_classes, buffer_rows, right - left), dtype=np.float32)
        weight_sum = np.zeros((buffer_rows, right - left), dtype=np.float32)
        top = 0  # raster row of buffer row 0: every row above it was handed out
        for index, row in enumerate(rows):
            strip = _read(read_window, row, left, window, right - left, height, width)
            origins = [(row, col) for col in band_cols]
            for start in range(0, len(origins), options.batch_size):
                chunk = origins[start : start + options.batch_size]
                batch = _batch(strip, [col - left for _, col in chunk], window, chunk, temporal)
                probabilities = predict(batch).numpy()
                if on_batch is not None:
                    on_batch()
                for (r, c), probs in zip(chunk, probabilities, strict=True):
                    r0, c0 = r - top, c - left
                    total[:, r0 : r0 + window, c0 : c0 + window] += probs * weights
                    weight_sum[r0 : r0 + window, c0 : c0 + window] += weights
            final = min(rows[index + 1] if index + 1 < len(rows) else padded_h, height)
            while final - top >= options.row_block or (index + 1 == len(rows) and top < height):
                count = min(options.row_block, final - top)
                part = total[:, :count] / weight_sum[:count]
                yield Block(top, core_start, part[:, :, core_start - left : core_end - left])
                total = np.roll(total, -count, axis=1)  # rows handed out leave the buffer
                weight_sum = np.roll(weight_sum, -count, axis=0)
                total[:, -count:] = 0.0
                weight_sum[-count:] = 0.0
                top += count


def _read(
    read_window: ReadWindow, row: int, col: int, rows: int, cols: int, height: int, width: int
) -> np.ndarray:
    """Rows x cols of the raster from (row, col), zeros beyond its bounds."""
    strip = read_window(row, col, max(0, min(rows, height - row)), max(0, min(cols, width - col)))
    if strip.shape[1:] == (rows, cols):
        return strip
    padded = np.zeros((strip.shape[0], rows, cols), dtype=strip.dtype)
    padded[:, : strip.shape[1], : strip.shape[2]] = strip
    return padded


def _batch(
    strip: np.ndarray,
    offsets: list[int],
    window: int,
    origins: list[tuple[int, int]],
    temporal: Temporal | None,
) -> Batch:
    aerial = np.stack([strip[:, :, offset : offset + window] for offset in offsets])
    batch: Batch = {"aerial": torch.from_numpy(np.ascontiguousarray(aerial))}
    if temporal is not None:
        from damformer.loading.collate import collate_samples

        series = [temporal(row, col, window) for row, col in origins]
        stacked = collate_samples(
            [{"key": "", "domain": "", "valid": True, "aerial": aerial[i], "label": None, **s}
             for i, s in enumerate(series)]
        )  # fmt: skip
        batch.update({key: stacked[key] for key in ("s2", "s2_mask", "s2_day_offsets")})
    return batch


def sliding_probabilities(
    aerial: np.ndarray,
    predict: Callable[[Batch], torch.Tensor],
    *,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int = 4,
    temporal: Temporal | None = None,
) -> np.ndarray:
    """(K, H, W) blended probabilities of a (C, H, W) raster held in memory (small rasters, tests)."""
    _, height, width = aerial.shape
    out = np.empty((num_classes, height, width), dtype=np.float32)
    options = SweepOptions(window, stride, batch_size, band_width=max(width, 1))
    read = lambda r, c, h, w: aerial[:, r : r + h, c : c + w]  # noqa: E731
    for block in sweep(
        read, height, width, predict, num_classes=num_classes, options=options, temporal=temporal
    ):
        rows, cols = block.probabilities.shape[1:]
        out[:, block.row : block.row + rows, block.col : block.col + cols] = block.probabilities
    return out
