"""What ``--resume`` may change in a config, and the refusal naming every other change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from damformer.config.sections import RunConfig, build_section
from damformer.errors import ConfigError
from damformer.models.factory import ModelConfig

# What --resume may change: the schedule's end, evaluation, logging, where the data and the run live,
# and the device. Anything else would continue a run with a mix of two experiments' settings.
# optim.grad_accum: on resume it follows from the checkpoint's global batch (engine/data.py).
RESUMABLE = ("optim.max_iters", "optim.grad_accum", "eval.", "log.", "data.source", "data.target",
             "data.target_test", "data.target_val", "run.output_dir", "run.device")  # fmt: skip


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every setting that differs.

    A key the saved config lacks (written by an older damformer) counts when its value is not the default.
    """
    before, now, defaults = _flat(saved), _flat(current), _flat(RunConfig().to_dict())
    changes = []
    for key, value in now.items():
        old = before.get(key, defaults.get(key))
        if old != value and not (
            isinstance(old, int | float) and isinstance(value, int | float) and old == value
        ):
            changes.append((key, old, value))
    return changes


def check_resume(saved: dict[str, Any], current: RunConfig, *, where: Path) -> None:
    """Refuse to resume ``where`` with settings other than the allowed ones (``RESUMABLE``).

    Raises:
        ConfigError: naming every changed key with both values (model keys first, in their own words).
    """
    changes = config_changes(saved, current.to_dict())
    model = [c for c in changes if c[0].startswith("model.")]
    shown = lambda items: "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in items)  # noqa: E731
    if model:
        saved_model = build_section(ModelConfig, saved["model"], "model").name
        raise ConfigError(
            f"{where}: made for model {saved_model!r} ({shown(model)}); this config builds "
            f"{current.model.name!r}: resume with the checkpoint's model settings, or start a new "
            "run.output_dir"
        )
    resumable = RESUMABLE
    if current.data.global_batch is not None:  # the per-process batch is a memory knob there
        resumable = (*RESUMABLE, "data.batch_size")
    refused = [c for c in changes if not c[0].startswith(resumable)]
    if refused:
        raise ConfigError(
            f"{where}: --resume with a changed config ({shown(refused)}). On resume only optim.max_iters, "
            "eval.*, log.*, the data folders, run.output_dir / run.device and (with data.global_batch) "
            "data.batch_size may change: restore the "
            "values, or start a new run.output_dir for another experiment"
        )
