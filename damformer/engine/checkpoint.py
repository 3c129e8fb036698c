"""Atomic checkpoints that resume exactly, loaded without executing pickle.

A checkpoint holds the student, the EMA teacher (and frozen encoder), the optimiser, the iteration,
every RNG state, the data stream cursors and the resolved config. It is written to a temporary file,
fsynced and renamed, so a crash mid-write leaves the previous checkpoint intact; it is read with
``torch.load(weights_only=True)``, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from damformer.errors import DamformerError

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(DamformerError):
    """A checkpoint is unreadable, of another format, or made for another model or run."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint (weights only: no code runs).

    Raises:
        CheckpointError: missing, unreadable, crafted (pickle with code) or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format: expected {CHECKPOINT_FORMAT}, found {found}")
    return state


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The global torch RNG (dropout, drop-path), CUDA's when present, and the UDA draw generator."""
    state = {"torch": torch.get_rng_state(), "uda": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["uda"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
