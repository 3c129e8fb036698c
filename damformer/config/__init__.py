"""Typed run configuration: dataclasses with defaults in code, YAML holding differences, ``--set`` overrides.

A config file has up to eight sections (all optional): ``data``, ``model``, ``uda``, ``optim``, ``eval``,
``log``, ``run`` and ``dist``. Keys are validated once, at start-up. An unknown key, a wrong type or a
bad value is a :class:`ConfigError` naming the key. The merged config is written into the run folder.

* :mod:`.sections`: the dataclasses; :mod:`.load`: YAML, overlays, ``--set``; :mod:`.checks`: the
  cross-field checks; :mod:`.resume`: what ``--resume`` may change; :mod:`.batch`: the global batch
  split over the processes.

    damformer train configs/demo/damformer.yaml --set optim.max_iters=200 --set uda.enabled=false
"""

from damformer.config.checks import WEIGHTS_HELP, validate
from damformer.config.load import apply_override, dump_config, load_config, read_yaml, yaml_problem
from damformer.config.resume import RESUMABLE, check_resume, config_changes
from damformer.config.sections import (
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    RunSettings,
    UDAConfig,
    build_section,
)
from damformer.errors import ConfigError

__all__ = [
    "RESUMABLE",
    "WEIGHTS_HELP",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "LogConfig",
    "OptimConfig",
    "RunConfig",
    "RunSettings",
    "UDAConfig",
    "apply_override",
    "build_section",
    "check_resume",
    "config_changes",
    "dump_config",
    "load_config",
    "read_yaml",
    "validate",
    "yaml_problem",
]
