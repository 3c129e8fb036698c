"""Batching of training samples: variable-length Sentinel-2 series padded, with an explicit time mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack training samples into a batch (each array is copied once, here).

    Returns:
        A dict with

        - ``aerial`` (B, 5, H, W) uint8: normalised on the device, where it is cheaper;
        - ``label`` (B, H, W) uint8 0..12, when every sample has one: cast with ``.long()`` after moving
          it to the device (8x fewer bytes through the loader queue and the host-to-device copy);
        - ``s2`` (B, T_max, 10, S, S) float32, zero-padded in time;
        - ``s2_mask`` (B, T_max) bool: True = a real date (an all-zero real frame is not padding);
        - ``s2_day_offsets`` (B, T_max) int64, 0 on padding;
        - ``valid`` (B,) bool: False for epoch padding samples;
        - ``keys`` and ``domains``: lists of patch ids and domain ids.
    """
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "domains": [s["domain"] for s in samples],
        "valid": torch.tensor([bool(s["valid"]) for s in samples]),
        "aerial": torch.from_numpy(np.stack([s["aerial"] for s in samples])),
    }
    if all(s["label"] is not None for s in samples):
        batch["label"] = torch.from_numpy(np.stack([s["label"] for s in samples]))
    if all(s["s2"] is not None for s in samples):
        steps = max(s["s2"].shape[0] for s in samples)
        first = samples[0]["s2"]
        s2 = np.zeros((len(samples), steps, *first.shape[1:]), dtype=np.float32)
        mask = np.zeros((len(samples), steps), dtype=bool)
        offsets = np.zeros((len(samples), steps), dtype=np.int64)
        for row, sample in enumerate(samples):
            count = sample["s2"].shape[0]
            s2[row, :count] = sample["s2"]
            mask[row, :count] = True
            offsets[row, :count] = sample["s2_day_offsets"]
        batch["s2"] = torch.from_numpy(s2)
        batch["s2_mask"] = torch.from_numpy(mask)
        batch["s2_day_offsets"] = torch.from_numpy(offsets)
    return batch
