"""Cross-field checks of a run config, once at start-up, before any compute (``ConfigError`` naming keys)."""

from __future__ import annotations

import logging
from pathlib import Path

from damformer.config.sections import RunConfig
from damformer.errors import ConfigError
from damformer.models.factory import ModelConfig, is_none

log = logging.getLogger(__name__)


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
    ("run", "seed", 0, False),  # numpy and torch seed generators take non-negative seeds
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
    if config.log.metric_interval is not None and config.log.metric_interval < 1:
        raise ConfigError(f"log.metric_interval: expected >= 1 (or null), found {config.log.metric_interval}")
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
