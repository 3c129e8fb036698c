"""The training loop on one process: data streams, UDA step, optimiser, schedule, evaluation, checkpoints.

    damformer train configs/demo/damformer.yaml                # runs/... as set in the config
    damformer train configs/demo/damformer.yaml --resume       # continue from OUTPUT/checkpoint.pt

Every piece that must survive a restart is in the checkpoint: student, teacher, optimiser, iteration,
RNG states and the data stream cursors, so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from damformer.config import ConfigError, RunConfig, dump_config
from damformer.data.loader import ShardSet
from damformer.data.shard_io import atomic_write_bytes
from damformer.data.streams import RareClassStream, endless_loader
from damformer.engine.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from damformer.engine.optim import build_optimizer, lr_factor, set_learning_rate
from damformer.eval.evaluate import evaluate, to_device
from damformer.eval.metrics import SegmentationScores
from damformer.models.factory import build_model
from damformer.progress import progress
from damformer.uda.dacs import SelfTraining

log = logging.getLogger(__name__)


S2_PIXEL_M = 10.0


def _due(iteration: int, interval: int) -> bool:
    """Whether a periodic action with this interval falls on ``iteration`` (interval 0: never)."""
    return interval > 0 and iteration % interval == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name} requested but no CUDA device is visible")
    return torch.device(name)


def open_shard_sets(config: RunConfig) -> tuple[ShardSet, ShardSet | None, ShardSet | None]:
    """Open source, target and target-test sets and check they fit the model (before any compute)."""
    data, model = config.data, config.model
    source = ShardSet(data.source, domains=data.source_domains)
    target = ShardSet(data.target, domains=data.target_domains) if config.uda.enabled else None
    test = ShardSet(data.target_test, domains=data.target_domains) if data.target_test else None
    for role, shard_set in (("source", source), ("target", target), ("target_test", test)):
        if shard_set is None:
            continue
        for folder, manifest in zip(getattr(data, role), shard_set.manifests, strict=True):
            params = manifest["params"]
            classes = len(manifest["class_pixels"]) or None
            if classes is not None and classes != model.num_classes:
                raise ConfigError(
                    f"data.{role}: {folder} holds {classes} classes, model.num_classes is {model.num_classes}"
                )
            if role != "target" and not params["with_labels"]:
                raise ConfigError(f"data.{role}: {folder} was sharded without labels (--no-labels)")
            if model.temporal and not params["with_s2"]:
                raise ConfigError(
                    f"data.{role}: {folder} has no Sentinel-2 (--no-s2) but the model is +T (model.temporal)"
                )
    if model.temporal:
        _check_footprint(model.footprint, source)
    return source, target, test


def _check_footprint(footprint: float, shard_set: ShardSet) -> None:
    """The model crops its LR logits to the aerial footprint: the fraction must match the data."""
    sample = shard_set.first_sample()
    if sample.s2 is None:
        return
    aerial_m = sample.aerial.shape[-1] * abs(sample.transform.a)
    crop = sample.s2.shape[-1]
    expected = aerial_m / (crop * S2_PIXEL_M)
    if abs(footprint - expected) > 0.02 * expected:
        raise ConfigError(
            f"model.footprint: {footprint:g}, but the shards' aerial patches ({sample.aerial.shape[-1]} px, "
            f"{aerial_m:g} m) cover {expected:.4g} of their {crop}-pixel Sentinel-2 crop "
            f"({crop * S2_PIXEL_M:g} m): set model.footprint={expected:.4g}"
        )


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    scores: SegmentationScores | None = None


class Trainer:
    """One training run (single process; the distributed engine wraps the same step).

    Args:
        config: the validated run config.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.device = resolve_device(config.run.device)
        self.source_set, self.target_set, self.test_set = open_shard_sets(config)
        torch.manual_seed(config.run.seed)
        self.model = build_model(config.model).to(self.device)
        self.uda = SelfTraining(self.model, config.uda, seed=config.run.seed).to(self.device)
        optim = config.optim
        self.optimizer = build_optimizer(
            self.model, lr=optim.lr, weight_decay=optim.weight_decay, head_lr_mult=optim.head_lr_mult
        )
        data, seed = config.data, config.run.seed
        if config.uda.rcs:
            self.source = RareClassStream(
                self.source_set,
                batch_size=data.batch_size,
                temperature=config.uda.rcs_temperature,
                min_pixels=config.uda.rcs_min_pixels,
                seed=seed,
                augment=data.augment,
            )
        else:
            self.source = endless_loader(
                self.source_set,
                batch_size=data.batch_size,
                seed=seed,
                shuffle_buffer=data.shuffle_buffer,
                augment=data.augment,
                num_workers=data.num_workers,
            )
        self.target = None
        if self.target_set is not None:
            self.target = endless_loader(
                self.target_set,
                batch_size=data.batch_size,
                seed=seed + 1,
                shuffle_buffer=data.shuffle_buffer,
                augment=data.augment,
                num_workers=data.num_workers,
            )
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, Any]] = []

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        return {
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "model_name": self.config.model.name,
            "uda": self.uda.state_dict(),  # student, teacher, frozen encoder
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.uda.generator),
            "source_stream": self.source.state_dict(),
            "target_stream": self.target.state_dict() if self.target is not None else None,
            "history": self.history,
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any], *, where: Path) -> None:
        """Restore :meth:`state_dict`; refuses a checkpoint of another model."""
        if state["config"]["model"] != self.config.to_dict()["model"]:
            raise ConfigError(
                f"{where}: made for model {state['model_name']!r} with other settings; "
                f"this config builds {self.config.model.name!r}"
            )
        self.uda.load_state_dict(state["uda"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.uda.generator)
        self.source.load_state_dict(state["source_stream"])
        if self.target is not None and state["target_stream"] is not None:
            self.target.load_state_dict(state["target_stream"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])

    def save(self) -> Path:
        """Write the checkpoint and the loss history (both atomically)."""
        path = self.output_dir / CHECKPOINT_NAME
        save_checkpoint(path, self.state_dict())
        atomic_write_bytes(self.output_dir / "history.json", json.dumps(self.history).encode())
        return path

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One optimiser step (``grad_accum`` micro-steps), then the teacher's EMA step."""
        optim = self.config.optim
        factor = lr_factor(self.iteration, warmup=optim.warmup, max_iters=optim.max_iters)
        set_learning_rate(self.optimizer, optim.lr, factor)
        self.model.train()
        totals: dict[str, float] = {}
        for _ in range(optim.grad_accum):
            source = to_device(self.source.next(), self.device)
            target = None
            if self.target is not None and self.iteration >= self.config.uda.source_warmup:
                target = to_device(self.target.next(), self.device)
            metrics = self.uda.forward_backward(source, target, scale=1.0 / optim.grad_accum)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / optim.grad_accum
        if optim.grad_clip is not None:
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.uda.update_teacher(self.iteration)
        totals["lr"] = optim.lr * factor
        totals["iteration"] = self.iteration
        self.iteration += 1
        return totals

    def evaluate(self) -> SegmentationScores | None:
        """Score the student (or the teacher, with eval.teacher) on the target test set."""
        if self.test_set is None:
            return None
        model = self.uda.teacher.model if (self.config.eval.teacher and self.uda.teacher) else self.model
        result = evaluate(
            model,
            self.test_set,
            num_classes=self.config.model.num_classes,
            batch_size=self.config.eval.batch_size,
        )
        self.evaluations.append(
            {
                "iteration": self.iteration,
                "miou": result.miou,
                "accuracy": result.accuracy,
                "iou": list(result.iou),
            }
        )
        log.info(
            "iteration %d: target mIoU %.2f, accuracy %.2f",
            self.iteration,
            100 * result.miou,
            100 * result.accuracy,
        )
        return result

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``optim.max_iters`` (or stop after ``stop_after`` iterations, for tests)."""
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.output_dir / CHECKPOINT_NAME
        if resume and checkpoint.is_file():
            self.load_state_dict(load_checkpoint(checkpoint), where=checkpoint)
            log.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        elif checkpoint.is_file() and not resume:
            raise ConfigError(
                f"{checkpoint} exists: pass --resume to continue it, or choose another run.output_dir"
            )
        dump_config(config, self.output_dir / "config.yaml")
        end = config.optim.max_iters if stop_after is None else min(config.optim.max_iters, stop_after)
        started, first = time.perf_counter(), self.iteration
        for _ in progress(range(self.iteration, end), desc="train", unit="it", total=end - self.iteration):
            metrics = self.step()
            self.history.append(metrics)
            done = self.iteration
            if _due(done, config.log.interval) or done == end:
                rate = (done - first) / max(time.perf_counter() - started, 1e-9)
                shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("iteration",))
                log.info("it %d/%d %s (%.2f it/s)", done, config.optim.max_iters, shown, rate)
            if _due(done, config.eval.interval) and done < config.optim.max_iters:
                self.evaluate()
            if _due(done, config.log.checkpoint_interval) or done == end:
                self.save()
        scores = None
        if self.iteration >= config.optim.max_iters:
            scores = self.evaluate()
            self.save()
            if scores is not None:
                atomic_write_bytes(
                    self.output_dir / "scores.json",
                    json.dumps(
                        {"miou": scores.miou, "accuracy": scores.accuracy, "iou": list(scores.iou)}
                    ).encode(),
                )
        return TrainResult(self.output_dir, self.iteration, self.history, scores)
