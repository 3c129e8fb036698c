"""A run folder and its checkpoint: the one schema that training writes and every command reads.

``damformer train`` writes into ``run.output_dir`` (:class:`RunFolder`): ``checkpoint.pt``,
``config.yaml`` (the config as stated), ``history.json`` (every step's metrics), ``scores.json`` (the
final scores), the figures, and with DeepSpeed a ``deepspeed/`` folder of per-rank shards named by the
checkpoint's ``"deepspeed"`` record. predict, eval, tracking and study read runs through this module
(and :func:`load_model`), never through the trainer.

Checkpoints: atomic, resume exactly, loaded without executing pickle.

A checkpoint holds the student, the EMA teacher (and frozen encoder), the optimiser, the iteration,
every RNG state, the data stream cursors and the resolved config.

What protects it:

* written to a temporary file in the same folder, fsynced and renamed over the old one: a crash or
  SIGKILL mid-write leaves the previous checkpoint intact, and the temporary is never read (a later run
  removes it: :func:`remove_stale_temporaries`);
* completeness and checksums: the file is torch's zip archive, whose central directory is written
  last and whose every record carries a CRC-32. torch itself checks neither, so :func:`load_checkpoint`
  verifies both before reading: a truncated or corrupted file is refused by name, never half-loaded;
* read with ``torch.load(weights_only=True)``: a crafted pickle cannot run code;
* a failed write (disk full, quota, permissions) raises :class:`CheckpointError` naming the file and
  leaves the previous checkpoint in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from damformer.atomic import atomic_path
from damformer.errors import ConfigError, DamformerError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # "format" in every checkpoint: another value is refused in one line
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
HISTORY_NAME = "history.json"
SCORES_NAME = "scores.json"
FAILURE_NAME = "failure.json"  # why a run stopped for good (a diverged training), until it is rerun
LOCK_NAME = ".lock"  # held by the training that writes the folder (hidden; its text names the holder)
DEEPSPEED_RECORD = "deepspeed"  # the checkpoint's key naming DeepSpeed's per-rank shards
# Where the networks' weights are in a checkpoint's "uda" state (damformer.uda.dacs.SelfTraining).
STUDENT_PREFIX, TEACHER_PREFIX = "student.", "teacher.model."
TEMP_PREFIX = "."  # hidden: a temporary never looks like a checkpoint to a user or a glob


@dataclass(frozen=True)
class RunFolder:
    """The files of one training run's folder (``run.output_dir``)."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        """The checkpoint (student, teacher, optimiser, RNG, data cursors, config, history)."""
        return self.path / CHECKPOINT_NAME

    @property
    def config(self) -> Path:
        """The config as stated (YAML)."""
        return self.path / CONFIG_NAME

    @property
    def history(self) -> Path:
        """Every optimiser step's metrics (JSON list)."""
        return self.path / HISTORY_NAME

    @property
    def failure(self) -> Path:
        """Why the run failed (JSON: ``reason``, ``iteration``), written when it stops for good."""
        return self.path / FAILURE_NAME

    @property
    def scores(self) -> Path:
        """The final scores (JSON): target test split, and "validation" when the run had one."""
        return self.path / SCORES_NAME


class RunFolderBusyError(DamformerError):
    """Another training writes this run folder."""


class CheckpointError(DamformerError):
    """A checkpoint is unreadable, of another format, or made for another model or run."""


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while a training writes it: a second training into it is refused.

    An exclusive ``flock`` on ``FOLDER/.lock``, released by the kernel when the holder exits, even killed:
    a crashed run never leaves a stale lock. The file's text names the holder (PID, host, start).

    Raises:
        RunFolderBusyError: naming the holder.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusyError(
            f"{folder}: a training writes this folder ({holder}); wait for it to end or stop it, or train "
            "into another run.output_dir"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        yield
    except BaseException:
        if created and [path.name for path in folder.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):  # refused before it wrote anything (--resume, no checkpoint):
                (folder / LOCK_NAME).unlink()  # no empty run folder is left behind
                folder.rmdir()
        raise
    finally:
        handle.close()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``.

    Raises:
        CheckpointError: the write failed (e.g. no space left); ``path`` still holds the previous one.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    except (OSError, RuntimeError) as exc:  # torch wraps a failed write of its zip writer in RuntimeError
        if path.is_file():
            kept, then = "the previous checkpoint is kept", "then resume with --resume"
        else:  # nothing to resume from: advising --resume would only fail again
            kept, then = "no checkpoint was written yet", "then run the same command again"
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({type(exc).__name__}: {exc}); {kept}. "
            f"Free space (or raise the quota) on that file system, {then}"
        ) from None


def remove_stale_temporaries(folder: Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Delete temporaries of ``name`` left in ``folder`` by a writer that was killed; returns them."""
    stale = sorted(folder.glob(f"{TEMP_PREFIX}{name}.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def verify_archive(path: Path) -> None:
    """Check that ``path`` is a complete zip archive whose records all match their CRC-32.

    Raises:
        CheckpointError: truncated (no central directory), not a torch checkpoint, or corrupted.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: incomplete or not a damformer checkpoint ({exc}); a write was cut off or the file "
            "was damaged: resume from a good copy, or start a new run.output_dir"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: record {bad} fails its CRC-32 check (the file is corrupted); resume from a good "
            "copy, or start a new run.output_dir"
        )


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint (weights only: no code runs) after checking it is complete and uncorrupted.

    Raises:
        CheckpointError: missing, incomplete, corrupted, crafted (pickle with code) or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    verify_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = [line for line in lines if "GLOBAL" in line]
        if blocked:  # weights_only refused a pickled object: nothing of it was executed
            raise CheckpointError(
                f"{path}: cannot read the checkpoint: it holds a Python object that is not weights "
                f"({blocked[0]}); refused without running it. Only load checkpoints you trust"
            ) from None
        reason = lines[0] if lines else ""
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {reason})"
        ) from None
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


def resume_point(output_dir: Path, resume: bool | str, *, clean: bool = True) -> Path | None:
    """The checkpoint a run continues from, or None for a fresh start; refuses the ambiguous cases.

    ``resume``: False starts a new run (an existing checkpoint is an error), True needs a checkpoint,
    ``"auto"`` continues one when present. ``clean``: remove temporaries of a cut-off write (rank 0).

    Raises:
        ConfigError: --resume without a checkpoint, or a checkpoint without --resume.
    """
    checkpoint = output_dir / CHECKPOINT_NAME
    if clean and output_dir.is_dir():
        for stale in remove_stale_temporaries(output_dir):
            log.warning("removed %s: a checkpoint write that was cut off (never read)", stale)
    if resume and checkpoint.is_file():
        return checkpoint
    if resume == "auto":
        log.info("no checkpoint in %s yet: starting fresh (--auto-resume)", output_dir)
        return None
    if resume:
        raise ConfigError(
            f"{checkpoint}: no checkpoint to resume from (the run never saved one, or this is another "
            "folder); drop --resume to start this run, or use --auto-resume in job scripts whose first "
            "attempt starts fresh"
        )
    if checkpoint.is_file():
        raise ConfigError(
            f"{checkpoint} exists: pass --resume to continue it, or choose another run.output_dir"
        )
    return None
