"""A trained model on disk: read from a checkpoint, a run folder or an exported folder; and exported.

An exported folder (``damformer export``) holds what a colleague needs to use the model, and nothing of
the training (teacher, optimiser, data cursors):

* ``model.safetensors``: the network's weights (the student's, or the EMA teacher's);
* ``model.json``: the model config, the class table, the input normalisation, the Sentinel-2 means of
  the training data, the iteration and the export format;
* ``README.md``: a model card (data, domains, recipe, iterations, scores with their split, commit);
* optionally ``model.torchscript.pt``: the inference network traced with TorchScript.

    import damformer
    model = damformer.load_model("exported/")      # or a checkpoint.pt, or a run folder; eval mode
    logits = model(aerial, s2, s2_mask, s2_days)["hr"]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from damformer.errors import ConfigError, DamformerError
from damformer.runtime.artifacts import (
    STUDENT_PREFIX,
    TEACHER_PREFIX,
    CheckpointError,
    RunFolder,
    load_checkpoint,
)

EXPORT_FORMAT = 1
WEIGHTS_NAME, CONFIG_NAME, CARD_NAME = "model.safetensors", "model.json", "README.md"
TORCHSCRIPT_NAME = "model.torchscript.pt"


@dataclass
class LoadedModel:
    """A network ready for inference, with what predict and evaluate need to know about it."""

    model: torch.nn.Module
    config: Any  # damformer.models.factory.ModelConfig
    iteration: int
    s2_mean: list[float] | None  # of the training data's Sentinel-2 bands (None: unknown)
    source: Path


def open_model(path: Path | str, *, teacher: bool = False) -> LoadedModel:
    """The network of a checkpoint file, a run folder (its checkpoint) or an exported folder, in eval mode.

    Raises:
        CheckpointError: unreadable, of another format, or holding NaN/inf weights.
        ConfigError: a model of other classes than FLAIR's, or weights that do not fit their config.
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        if teacher:
            raise ConfigError(f"{path}: an exported folder holds one network; --teacher needs a checkpoint")
        return _open_export(path)
    if path.is_dir():
        path = RunFolder(path).checkpoint
    state = load_checkpoint(path)
    prefix = TEACHER_PREFIX if teacher else STUDENT_PREFIX
    weights = {k.removeprefix(prefix): v for k, v in state["uda"].items() if k.startswith(prefix)}
    if not weights:
        raise ConfigError(f"{path}: no {'teacher' if teacher else 'student'} weights in it")
    model, config = _build(path, state["config"]["model"], weights)
    return LoadedModel(model, config, int(state["iteration"]), state.get("s2_mean"), path)


def load_model(path: Path | str, *, teacher: bool = False) -> torch.nn.Module:
    """A checkpoint's, run folder's or exported folder's network, in eval mode (``damformer.load_model``).

    ``model(aerial, s2, s2_mask, s2_days)["hr"]``: (B, 13, H, W) logits from raw inputs (aerial 0..255,
    Sentinel-2 reflectance x 10000); aerial-only models take ``model(aerial)``.
    """
    return open_model(path, teacher=teacher).model


def _build(where: Path, model_values: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    from damformer.config import build_section
    from damformer.data.classes import FLAIR_CLASSES
    from damformer.models.factory import ModelConfig, build_model

    config = build_section(ModelConfig, model_values, "model")
    if config.num_classes != len(FLAIR_CLASSES):
        raise ConfigError(
            f"{where}: a model of {config.num_classes} classes; maps, colours and scores here are for the "
            f"{len(FLAIR_CLASSES)} FLAIR classes"
        )
    broken = next(
        (k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None
    )
    if broken is not None:
        raise CheckpointError(
            f"{where}: weight {broken} holds NaN or infinite values (a diverged training): its maps and "
            "scores would be meaningless; use a checkpoint of a run that did not diverge"
        )
    # Every weight is in the file: the ImageNet weights named at training time need not exist here.
    model = build_model(dataclasses.replace(config, pretrained=None))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise ConfigError(
            f"{where}: its weights do not fit its own model config ({first[0].strip()})"
        ) from None
    return model.eval(), config


def _open_export(folder: Path) -> LoadedModel:
    from safetensors.torch import load_file

    try:
        record = json.loads((folder / CONFIG_NAME).read_text())
        weights = load_file(folder / WEIGHTS_NAME)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: not a readable damformer export ({exc})") from None
    if record.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: export format: expected {EXPORT_FORMAT}, found {record.get('format')}; "
            "export it again with this damformer version"
        )
    model, config = _build(folder, record["model"], weights)
    return LoadedModel(model, config, int(record["iteration"]), record.get("s2_mean"), folder)


class ExportError(DamformerError):
    """An export folder cannot be written (it exists, or the checkpoint is unusable)."""
