"""Reading a config: YAML file, overlays, ``--set`` overrides, then validation; writing the merged one.

damformer train configs/demo/damformer.yaml --set optim.max_iters=200 --set uda.enabled=false
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from damformer.config.checks import validate
from damformer.config.sections import RunConfig, build_section
from damformer.errors import ConfigError, DamformerError


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML: numbers, booleans, lists) to a raw mapping."""
    key, sep, text = assignment.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. optim.lr=1e-4")
    section, name = key.strip().split(".", 1)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = text
    values.setdefault(section, {})
    if not isinstance(values[section], dict):
        raise ConfigError(f"--set {assignment!r}: {section} is not a section")
    values[section][name] = parsed


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem}{where}"


def read_yaml(path: Path, what: str, error: type[DamformerError]) -> Any:
    """The YAML document in ``path``; unreadable or invalid is ``error`` with one line naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {yaml_problem(exc)}") from None


def load_config(
    path: Path | str | None,
    overrides: list[str] | tuple[str, ...] = (),
    overlays: list[Path] | tuple[Path, ...] = (),
    *,
    check_files: bool = True,
) -> RunConfig:
    """Read a YAML config (or none: the defaults), then overlay files, then ``--set`` overrides; validate.

    An overlay holds sections like a config; each of its values replaces the one before it
    (``configs/ablation/miniature.yaml`` turns an ablation cell into a miniature run).
    ``check_files=False`` skips the checks of what the run reads (shard sets named, pretrained weights
    present): for plans and dry runs.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or bad values, naming the key.
    """
    values: dict[str, Any] = {}
    for number, file in enumerate([*([path] if path is not None else []), *overlays]):
        file = Path(file)
        layer = read_yaml(file, "the config" if number == 0 else "the overlay", ConfigError) or {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{file}: expected a mapping of sections, found {type(layer).__name__}")
        for section, entries in layer.items():
            if isinstance(entries, dict) and isinstance(values.get(section), dict):
                values[section] = {**values[section], **entries}
            else:
                values[section] = entries
    for assignment in overrides:
        apply_override(values, assignment)
    config = build_section(RunConfig, values, "")
    validate(config, check_files=check_files)
    return config


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the merged config as YAML (atomically)."""
    from damformer.atomic import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
