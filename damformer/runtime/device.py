"""Device and mixed precision: what training, evaluation and prediction share (no training code here).

``run.precision`` / ``--precision``: ``fp32``; ``bf16`` autocast (A100/H100, and CPU); ``fp16`` autocast
with a dynamic loss scale (GradScaler), the V100 path, as V100 has no bf16.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from damformer.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA request without a visible GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name} requested but no CUDA device is visible")
    return torch.device(name)


def amp_context(name: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, GradScaler or None) for a precision name."""
    if name == "fp32":
        return contextlib.nullcontext, None
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"run.precision: bf16 is not supported on {torch.cuda.get_device_name(device)} "
            "(V100 and older): use run.precision=fp16"
        )
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
