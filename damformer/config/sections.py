"""The run config's sections as typed dataclasses (defaults in code), and building them from YAML values.

A config file has up to eight sections (all optional): ``data``, ``model``, ``uda``, ``optim``, ``eval``,
``log``, ``run`` and ``dist``. An unknown key or a wrong type is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from damformer.errors import ConfigError
from damformer.models.factory import ModelConfig


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
            number that cannot split it is refused (damformer.config.batch). None: ``batch_size`` is per
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
        interval: console lines: the mean of every loss and rate over the interval.
        metric_interval: tracked (MLflow) points, each the mean over its interval; None: about 100 points
            a run (``optim.max_iters / 100``), a readable curve.
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
    metric_interval: int | None = None
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
