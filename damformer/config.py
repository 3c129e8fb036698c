"""Typed run configuration: dataclasses with defaults in code, YAML holding differences, ``--set`` overrides.

A config file has up to seven sections (all optional): ``data``, ``model``, ``uda``, ``optim``, ``eval``,
``log`` and ``run``. Keys are validated once, at start-up. An unknown key, a wrong type or a bad value
is a :class:`ConfigError` naming the key. The merged config is written into the run folder.

    damformer train configs/demo/damformer.yaml --set optim.max_iters=200 --set uda.enabled=false
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from damformer.errors import ConfigError, DamformerError
from damformer.models.factory import ModelConfig, is_none

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Shard sets: labelled source, unlabelled target, labelled target test (for evaluation).

    Attributes:
        source, target, target_test: shard-set folders (each a list).
        target_val: labelled target shard sets set aside for choosing recipes (e.g. a labelled north
            split): scored at the end beside ``target_test`` (``scores.json`` "validation"), so that
            choices are made without looking at the test split. Optional.
        source_domains, target_domains: restrict the sets to these domains (ids, prefixes, presets).
        global_batch: source samples per optimiser step over every process (the target stream takes as
            many): the recipe's batch, the same on 1 GPU or 64 (DAFormer and DAM-Former: 2). The
            per-process batch and the gradient accumulation follow from the number of processes, and a
            number that cannot split it is refused (damformer.engine.batch). None: ``batch_size`` is per
            process and the global batch grows with the number of processes (older configs).
        batch_size: with ``global_batch``: the most samples one process takes per forward/backward pass
            (None: its whole share; more is accumulated). Without: source and target samples per step
            and process (None: 2).
        num_workers: DataLoader workers of the target stream.
        shuffle_buffer: seeded shuffle buffer of the streams.
        augment: random flips / rot90 (aerial, label, every S2 date alike).
        verify_shards: check each shard's size and sha256 against its manifest before reading it:
            ``first`` (the first epoch a process reads, the default: about one more read of the data),
            ``always`` or ``never``. A flipped byte is otherwise trained on silently.
        on_error: a corrupt shard or sample: ``raise`` (stop, naming it) or ``skip`` it (with a warning).
    """

    source: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    target_test: list[str] = field(default_factory=list)
    target_val: list[str] = field(default_factory=list)
    source_domains: list[str] | None = None
    target_domains: list[str] | None = None
    global_batch: int | None = None
    batch_size: int | None = None
    num_workers: int = 0
    shuffle_buffer: int = 64
    augment: bool = True
    verify_shards: str = "first"
    on_error: str = "raise"


@dataclass
class UDAConfig:
    """Self-training (method.md section 5). ``enabled: false`` trains on the source only (baselines).

    Attributes:
        ema_alpha: the teacher's largest EMA factor.
        pseudo_threshold, pseudo_weight: confidence threshold; weight per ``batch``, ``image`` or ``pixel``.
        teacher_norm: the teacher's BatchNorm statistics: ``batch`` (those of the target batch it labels,
            DAFormer) or ``running`` (the student's running averages).
        classmix, strong_augment: ClassMix per image; colour jitter + blur of the mixed images.
        hr_weight, lr_weight: mixed loss: weights of the HR and LR cross-entropies (LR needs +T).
        ensemble_lr_weight: ensemble pseudo-labels: weight w of the teacher's LR probabilities (0: HR only).
        ensemble: how HR and LR probabilities combine, which sets what the confidence means:
            ``released`` (the authors' code): softmax(HR) + w softmax(LR), confidence = its maximum
            (0 .. 1 + w), so a pixel the HR branch is sure of always passes; ``normalised``:
            (1 - w) softmax(HR) + w softmax(LR), a probability, which at the threshold 0.968 and
            w = 0.2 needs p_LR >= 0.84 to pass (give it a lower ``pseudo_threshold``).
        rcs, rcs_temperature, rcs_min_pixels: rare class sampling of the source (None: scaled 3000).
        feature_distance, fd_lambda, fd_classes: ImageNet feature distance (needs pretrained weights).
        region_loss, region_weight: ``dice`` adds a soft Dice loss to the HR cross-entropy (off: ``none``).
        mic, mic_ratio, mic_block, mic_weight: masked image consistency on the target (off by default).
        source_warmup: iterations of source-only training before self-training starts (0, DAFormer's
            choice from ImageNet weights). Short runs from scratch need it: a teacher that has not
            learnt the source yet labels the target wrongly, and self-training then confirms its errors.
    """

    enabled: bool = True
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    pseudo_weight: str = "batch"
    teacher_norm: str = "batch"
    classmix: bool = True
    strong_augment: bool = True
    hr_weight: float = 1.0
    lr_weight: float = 1.0
    ensemble_lr_weight: float = 0.2
    ensemble: str = "released"
    rcs: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int | None = None
    feature_distance: bool = False
    fd_lambda: float = 0.005
    fd_classes: list[int] = field(default_factory=lambda: [0])
    region_loss: str = "none"
    region_weight: float = 1.0
    mic: bool = False
    mic_ratio: float = 0.7
    mic_block: int = 32
    mic_weight: float = 1.0
    source_warmup: int = 0


@dataclass
class OptimConfig:
    """AdamW, warmup + poly (method.md section 6), accumulation and clipping.

    Attributes:
        head_lr_mult: learning-rate factor of the randomly initialised heads (HR decoder, LR logits).
        head_lr_scope: which parameters take ``head_lr_mult``: ``heads`` (ours: the whole HR decoder and
            the LR logits, all randomly initialised) or ``classifier`` (the authors' release: the HR
            decoder's last conv only; its U-Net decoder and LR logits train at the base rate).
        temporal_lr_mult: learning-rate factor of the Sentinel-2 branch (U-TAE) and the deep temporal
            fusion (ours: 10; the release: 1). They start from random weights like the heads, while the
            MiT starts from ImageNet.
    """

    lr: float = 6e-5
    head_lr_mult: float = 10.0
    head_lr_scope: str = "heads"
    temporal_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 1500
    max_iters: int = 40000
    grad_accum: int = 1
    grad_clip: float | None = None


@dataclass
class EvalConfig:
    """Periodic evaluation on ``data.target_test`` (0: only at the end)."""

    interval: int = 4000
    batch_size: int = 2
    teacher: bool = False


@dataclass
class LogConfig:
    """Logging, tracking and checkpoint cadence, in iterations (0: only at the end of the run).

    Attributes:
        tracking: log the run to MLflow (rank 0): params, metrics, figures and the final checkpoint.
        tracking_uri: MLflow store or server; None: the store of the run folder's parent folder,
            ``sqlite:///PARENT/mlflow.db`` (artifacts in ``PARENT/mlartifacts``), so runs launched side
            by side (``runs/demo/*``) share one store. A server (``http://host:port``) for clusters.
        experiment: MLflow experiment; None: the config file's folder (``configs/ablation/x.yaml``
            -> ``ablation``), ``damformer`` without a file.
        mosaic_patches: target test patches shown in the prediction mosaic PNG.
        run_name: the MLflow run's name; None: model x inputs x source->target.
        upload_checkpoint: copy the final checkpoint into the artifact store (default: only its path
            and sha256 as tags: a MiT-b5 checkpoint is a gigabyte).
        system_metrics: MLflow's own sampling of CPU, memory and GPU use (GPU needs pynvml).
        parent_run_id: nest the run under this MLflow run (a study's parent run, ``damformer study``).
    """

    interval: int = 50
    checkpoint_interval: int = 1000
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None
    mosaic_patches: int = 4
    run_name: str | None = None
    parent_run_id: str | None = None
    upload_checkpoint: bool = False
    system_metrics: bool = True


@dataclass
class RunSettings:
    """Where and how: output folder, seed, device (``auto``: CUDA when available) and precision.

    Attributes:
        precision: ``fp32``; ``bf16`` autocast (A100/H100, and CPU); ``fp16`` autocast with a dynamic
            loss scale (GradScaler), the V100 path: V100 has no bf16. Overflowing fp16 steps are
            skipped and counted (``overflow_steps`` in the history), not fatal.
        compile: ``torch.compile`` the student's and the teacher's forward passes (one graph each: the
            models have no data-dependent shapes). The first steps pay the compilation (tens of seconds).
        compile_backend: ``inductor`` (generated kernels); ``aot_eager`` traces forward and backward
            without generating code (to check a model compiles, quickly).
        channels_last: convolutions in NHWC memory format (faster on tensor-core GPUs).
    """

    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False


@dataclass
class DistConfig:
    """Data parallelism, used when the run is launched on several processes (torchrun, srun).

    Attributes:
        engine: ``ddp`` (DistributedDataParallel around the student; the EMA teacher is updated
            identically on every rank without communication) or ``deepspeed`` (ZeRO stage 1 or 2
            around our AdamW: optimiser state, and with stage 2 gradients, partitioned over the ranks).
        sync_bn: convert the student's BatchNorm layers to SyncBatchNorm (CUDA only: batch statistics
            over the global batch instead of each rank's).
        find_unused_parameters: DDP's option, for models whose forward leaves parameters unused.
        zero_stage: DeepSpeed ZeRO stage, 1 or 2; None: the JSON's ``zero_optimization.stage``, else 2.
        deepspeed_config: a DeepSpeed JSON (launch/deepspeed/zero1.json, zero2.json) for ZeRO bucket
            sizes and fp16 loss-scale settings; batch sizes, accumulation, clipping and precision
            come from this run config and may not be set there. None: the built-in defaults.
    """

    engine: str = "ddp"
    sync_bn: bool = False
    find_unused_parameters: bool = False
    zero_stage: int | None = None
    deepspeed_config: str | None = None


@dataclass
class RunConfig:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    uda: UDAConfig = field(default_factory=UDAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunSettings = field(default_factory=RunSettings)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for YAML, checkpoints and tracking)."""
        return dataclasses.asdict(self)


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)  # YAML 1.1 reads 6e-5 (no dot) as a string; everyone writes it that way
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {annotation.__name__}, found {value!r}")
    return value


def build_section(cls: type, values: Any, prefix: str) -> Any:
    """Build the dataclass ``cls`` from a YAML mapping, checking keys and types (``prefix`` names it)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, found {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = build_section(annotation, value, f"{prefix}.{name}" if prefix else name)
        else:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, value, annotation)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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


def validate(config: RunConfig, *, check_files: bool = True) -> None:
    """Cross-field checks that need no data (the data checks run when the shard sets open)."""
    if config.uda.pseudo_weight not in ("batch", "image", "pixel"):
        raise ConfigError(
            f"uda.pseudo_weight: expected batch, image or pixel, found {config.uda.pseudo_weight!r}"
        )
    if not 0 < config.uda.pseudo_threshold < 1:
        raise ConfigError(
            f"uda.pseudo_threshold: expected a value in (0, 1), found {config.uda.pseudo_threshold}"
        )
    if config.uda.region_loss not in ("none", "dice"):
        raise ConfigError(f"uda.region_loss: expected none or dice, found {config.uda.region_loss!r}")
    if config.uda.teacher_norm not in ("batch", "running"):
        raise ConfigError(f"uda.teacher_norm: expected batch or running, found {config.uda.teacher_norm!r}")
    if not 0 <= config.uda.ensemble_lr_weight <= 1:
        raise ConfigError(f"uda.ensemble_lr_weight: expected 0..1, found {config.uda.ensemble_lr_weight}")
    if config.optim.head_lr_scope not in ("heads", "classifier"):
        raise ConfigError(
            f"optim.head_lr_scope: expected heads or classifier, found {config.optim.head_lr_scope!r}"
        )
    if config.uda.ensemble not in ("released", "normalised"):
        raise ConfigError(f"uda.ensemble: expected released or normalised, found {config.uda.ensemble!r}")
    _validate_ranges(config)
    _validate_dependencies(config)
    _validate_pretrained(config.model, check_files=check_files)
    if config.data.verify_shards not in ("first", "always", "never"):
        raise ConfigError(
            f"data.verify_shards: expected first, always or never, found {config.data.verify_shards!r}"
        )
    if config.data.on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error: expected raise or skip, found {config.data.on_error!r}")
    for section, key in (("log", "interval"), ("log", "checkpoint_interval"), ("eval", "interval")):
        value = getattr(getattr(config, section), key)
        if value < 0:
            raise ConfigError(f"{section}.{key}: expected >= 0 (0: only at the end), found {value}")
    if not 0 <= config.uda.source_warmup < max(config.optim.max_iters, 1):
        raise ConfigError(
            f"uda.source_warmup: expected 0 <= warmup < optim.max_iters ({config.optim.max_iters}), "
            f"found {config.uda.source_warmup}"
        )
    for key in ("max_iters", "grad_accum"):
        if getattr(config.optim, key) < 1:
            raise ConfigError(f"optim.{key}: expected >= 1, found {getattr(config.optim, key)}")
    for key in ("global_batch", "batch_size"):
        value = getattr(config.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}: expected >= 1 (or null), found {value}")
    if check_files and not config.data.source:
        raise ConfigError("data.source: expected at least one source shard set (damformer shard --out DIR)")
    if check_files and config.uda.enabled and not config.data.target:
        raise ConfigError("data.target: UDA needs a target shard set (or set uda.enabled=false)")
    if config.run.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"run.precision: expected fp32, bf16 or fp16, found {config.run.precision!r}")
    if config.dist.engine not in ("ddp", "deepspeed"):
        raise ConfigError(f"dist.engine: expected ddp or deepspeed, found {config.dist.engine!r}")
    if config.dist.zero_stage not in (None, 1, 2):
        raise ConfigError(
            f"dist.zero_stage: expected 1 or 2, found {config.dist.zero_stage!r} "
            "(stage 3 partitions the weights, which the EMA teacher reads every step)"
        )
    backend = config.run.compile_backend
    if backend not in ("inductor", "aot_eager", "eager"):
        raise ConfigError(f"run.compile_backend: expected inductor, aot_eager or eager, found {backend!r}")
    if config.run.compile and config.dist.engine == "deepspeed":
        raise ConfigError("run.compile: not with dist.engine=deepspeed (its engine wraps the model); use ddp")
    if config.run.device not in ("auto", "cpu", "cuda") and not config.run.device.startswith("cuda:"):
        raise ConfigError(f"run.device: expected auto, cpu or cuda[:N], found {config.run.device!r}")


# Numeric values with a lower bound: (section, key, bound, strict: ">" rather than ">=").
_LOWER_BOUNDS = (
    ("optim", "lr", 0.0, True),
    ("optim", "weight_decay", 0.0, False),
    ("optim", "head_lr_mult", 0.0, True),
    ("optim", "temporal_lr_mult", 0.0, True),
    ("optim", "warmup", 0, False),
    ("data", "num_workers", 0, False),
    ("data", "shuffle_buffer", 0, True),  # the loader needs >= 1 (1: no shuffling)
    ("eval", "batch_size", 0, True),
    ("log", "mosaic_patches", 0, False),
    ("uda", "hr_weight", 0.0, False),
    ("uda", "lr_weight", 0.0, False),
    ("uda", "region_weight", 0.0, False),
    ("uda", "fd_lambda", 0.0, False),
    ("uda", "mic_weight", 0.0, False),
    ("uda", "mic_block", 0, True),
    ("uda", "rcs_temperature", 0.0, True),
)


WEIGHTS_HELP = (
    "ImageNet weights are read from a local path, never downloaded: on a machine with internet, "
    "fetch SegFormer's {size}.pth (the ImageNet-1k encoder release) or the Hugging Face folder "
    "nvidia/{hf} (config.json + model.safetensors), copy it to this path (or set model.pretrained to "
    "where it is)"
)


def _validate_pretrained(model: ModelConfig, *, check_files: bool = True) -> None:
    """A MiT arch trains from ImageNet weights unless ``model.pretrained: none`` says otherwise."""
    if model.arch == "unet_c":  # a CNN encoder without pretrained weights
        return
    if model.pretrained is None:
        raise ConfigError(
            f"model.pretrained: not set for {model.name} ({model.mit_size}); point it to ImageNet weights "
            f"(e.g. weights/{model.mit_size}.pth) or set model.pretrained=none to train from random weights "
            "on purpose"
        )
    if is_none(model.pretrained):
        if model.mit_size not in ("mit_b0", "mit_b1"):
            log.warning(
                "model.pretrained=none: the %s encoder trains from random weights; DAFormer's recipe "
                "(lr 6e-5, 40k iterations) assumes ImageNet weights, so expect a much weaker model",
                model.mit_size,
            )
        return
    path = Path(model.pretrained)
    if check_files and not path.exists():
        raise ConfigError(
            f"model.pretrained: {path} not found. "
            + WEIGHTS_HELP.format(size=model.mit_size, hf=model.mit_size.replace("_", "-"))
            + "; or set model.pretrained=none to train from random weights"
        )


def _validate_dependencies(config: RunConfig) -> None:
    """Refuse ``uda.*`` / ``model.*`` / ``eval.*`` combinations that train something else than they say.

    An ablation row must measure what it is named after.
    """
    uda, model = config.uda, config.model
    if uda.enabled and model.temporal and uda.lr_weight == 0 and uda.ensemble_lr_weight > 0:
        raise ConfigError(
            f"uda.lr_weight 0 with uda.ensemble_lr_weight {uda.ensemble_lr_weight:g}: without the mixed "
            "loss the LR head is never trained, and the ensemble pseudo-labels would add its untrained "
            "output. Remove both (uda.ensemble_lr_weight=0 too: the row without ML and EP) or keep the "
            "mixed loss"
        )
    if model.temporal and not model.fusion_levels and uda.lr_weight == 0:
        raise ConfigError(
            "model.temporal with model.fusion_levels [] and uda.lr_weight 0: the Sentinel-2 branch feeds "
            "nothing that is trained (no fusion, no LR loss), so the run is aerial-only in a +T name; set "
            "model.temporal=false, or keep a fusion level or the LR loss"
        )
    if uda.enabled and uda.feature_distance and (model.arch == "unet_c" or is_none(model.pretrained)):
        reason = "a CNN encoder without them" if model.arch == "unet_c" else "model.pretrained=none"
        raise ConfigError(
            f"uda.feature_distance: the distance is to ImageNet weights, and this model has none ({reason}): "
            "set uda.feature_distance=false, or give model.pretrained"
        )
    if config.eval.teacher and not uda.enabled:
        raise ConfigError(
            "eval.teacher: a source-only run (uda.enabled=false) has no EMA teacher to evaluate; set "
            "eval.teacher=false"
        )


def _validate_ranges(config: RunConfig) -> None:
    """Every bounded number, checked before any compute (a bad value fails here, not mid-run)."""
    for section, key, bound, strict in _LOWER_BOUNDS:
        value = getattr(getattr(config, section), key)
        if value < bound or (strict and value == bound):
            expected = f"> {bound}" if strict else f">= {bound}"
            raise ConfigError(f"{section}.{key}: expected {expected}, found {value}")
    if config.optim.grad_clip is not None and config.optim.grad_clip <= 0:
        raise ConfigError(
            f"optim.grad_clip: expected > 0 (or null: no clipping), found {config.optim.grad_clip}"
        )
    if not 0 <= config.uda.ema_alpha < 1:
        raise ConfigError(f"uda.ema_alpha: expected 0 <= alpha < 1, found {config.uda.ema_alpha}")
    if not 0 <= config.uda.mic_ratio < 1:
        raise ConfigError(f"uda.mic_ratio: expected 0 <= ratio < 1, found {config.uda.mic_ratio}")
    if config.uda.rcs_min_pixels is not None and config.uda.rcs_min_pixels < 0:
        raise ConfigError(f"uda.rcs_min_pixels: expected >= 0 (or null), found {config.uda.rcs_min_pixels}")


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


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the merged config as YAML (atomically)."""
    from damformer.atomic import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
