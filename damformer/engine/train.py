"""The training loop: data streams, UDA step, optimiser, schedule, AMP, evaluation, checkpoints.

    damformer train configs/demo/damformer.yaml                # runs/... as set in the config
    damformer train configs/demo/damformer.yaml --resume       # continue from OUTPUT/checkpoint.pt
    torchrun --nproc_per_node=4 -m damformer train CONFIG      # DDP, one process per GPU

Every piece that must survive a restart is in the checkpoint: student, teacher, optimiser, loss scale,
iteration, and per rank the RNG states and data stream cursors, so a resumed run reproduces the
uninterrupted one exactly. Under DDP every rank runs the same step on its own share of the data
(global batch = per-rank batch x world size x grad_accum); gradients are averaged by DDP, the EMA
teacher is updated identically on every rank from identical student weights, metrics and confusion
matrices are reduced over the ranks, and rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from damformer.config import ConfigError, RunConfig, check_resume, dump_config
from damformer.data.loader import ShardSet
from damformer.data.sentinel import S2_PIXEL_M
from damformer.data.shard_io import atomic_write_bytes
from damformer.data.streams import RareClassStream, endless_loader
from damformer.engine import deepspeed_engine
from damformer.engine.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from damformer.engine.cpu_memory import retain_freed_memory
from damformer.engine.device import amp_context, resolve_device
from damformer.engine.distributed import (
    DistContext,
    barrier,
    gather_objects,
    mean_over_ranks,
    sum_over_ranks,
)
from damformer.engine.optim import build_optimizer, lr_factor, set_learning_rate
from damformer.engine.stop import StopRequest
from damformer.eval.evaluate import evaluate, to_device
from damformer.eval.metrics import SegmentationScores
from damformer.models.factory import build_model, is_none
from damformer.progress import progress
from damformer.tracking import training as tracking
from damformer.tracking.mlflow_tracker import Tracker, hostname
from damformer.uda.dacs import SelfTraining

log = logging.getLogger(__name__)


STOP_CHECK_STEPS = 10  # under DDP, the ranks agree on stop requests this often (and at log intervals)


def _due(iteration: int, interval: int) -> bool:
    """Whether a periodic action with this interval falls on ``iteration`` (interval 0: never)."""
    return interval > 0 and iteration % interval == 0


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


def _warn_if_large_mit_from_scratch(config: RunConfig) -> None:
    model = config.model
    if model.arch != "unet_c" and is_none(model.pretrained) and model.mit_size not in ("mit_b0", "mit_b1"):
        log.warning(
            "model.pretrained=none: the %s encoder trains from random weights; DAFormer's recipe "
            "(lr 6e-5, 40k iterations) assumes ImageNet weights, so expect a much weaker model",
            model.mit_size,
        )


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    scores: SegmentationScores | None = None
    stopped: str | None = None  # why the run stopped early on request (a signal, the stop file)


class Trainer:
    """One training run, on one process or as one rank of a DDP job.

    Args:
        config: the validated run config.
        dist: this process's place among the ranks (:func:`damformer.engine.distributed.init_distributed`);
            None: a single process.
    """

    def __init__(self, config: RunConfig, dist: DistContext | None = None) -> None:
        self.config = config
        self.dist = dist or DistContext()
        rank, world = self.dist.rank, self.dist.world_size
        self.output_dir = Path(config.run.output_dir)
        self.device = resolve_device(config.run.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        retain_freed_memory(self.device)  # on CPU: no page faults on activations at every step
        self.autocast, self.scaler = amp_context(config.run.precision, self.device)
        if config.dist.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ConfigError("dist.sync_bn: SyncBatchNorm needs CUDA devices; set dist.sync_bn=false on CPU")
        self.source_set, self.target_set, self.test_set = open_shard_sets(config)
        _warn_if_large_mit_from_scratch(config)
        torch.manual_seed(config.run.seed)  # the same initial weights on every rank
        model = build_model(config.model)
        if config.dist.sync_bn and self.dist.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if config.run.channels_last:
            self.model.to(memory_format=torch.channels_last)  # the teacher, a copy, inherits it
        if self.dist.enabled:
            torch.manual_seed(config.run.seed + 1_000_003 * rank)  # dropout / drop-path differ per rank
        self.uda = SelfTraining(self.model, config.uda, seed=config.run.seed + 7919 * rank).to_device(
            self.device
        )
        self.uda.autocast = self.autocast
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.engine_name = config.dist.engine if self.dist.enabled else "single"
        if self.engine_name == "ddp":
            # MIC's loss reads only the HR output: a model with an LR head leaves it unused there.
            unused = config.dist.find_unused_parameters or (config.uda.enabled and config.uda.mic)
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
            self.uda.use_student_forward(self.ddp)
        if config.run.compile:
            self.uda.compile(config.run.compile_backend)
        optim = config.optim
        self.optimizer = build_optimizer(
            self.model,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            head_lr_mult=optim.head_lr_mult,
            temporal_lr_mult=optim.temporal_lr_mult,
            fused=self.device.type == "cuda",  # one kernel for every parameter's update
        )
        self.ds: Any = None  # the DeepSpeed engine (dist.engine=deepspeed on several processes)
        if self.engine_name == "deepspeed":
            ds_config = deepspeed_engine.deepspeed_config(config, world, self.device)
            self.ds = deepspeed_engine.initialize(self.model, self.optimizer, ds_config, self.device)
            self.uda.use_student_forward(self.ds)
            log.info("DeepSpeed ZeRO stage %d", ds_config["zero_optimization"]["stage"])
            if self.scaler is not None:
                self.scaler = None  # fp16: DeepSpeed's own dynamic loss scaler
        elif config.dist.engine == "deepspeed":
            log.info("one process: dist.engine=deepspeed has nothing to partition, training without it")
        data, seed = config.data, config.run.seed
        if config.uda.rcs:
            self.source = RareClassStream(
                self.source_set,
                batch_size=data.batch_size,
                temperature=config.uda.rcs_temperature,
                min_pixels=config.uda.rcs_min_pixels,
                seed=seed,
                augment=data.augment,
                rank=rank,
                world_size=world,
                verify=data.verify_shards,
                on_error=data.on_error,
                pin_memory=self.device.type == "cuda",
            )
        else:
            self.source = endless_loader(
                self.source_set,
                batch_size=data.batch_size,
                seed=seed,
                shuffle_buffer=data.shuffle_buffer,
                augment=data.augment,
                num_workers=data.num_workers,
                rank=rank,
                world_size=world,
                verify=data.verify_shards,
                on_error=data.on_error,
                pin_memory=self.device.type == "cuda",
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
                rank=rank,
                world_size=world,
                verify=data.verify_shards,
                on_error=data.on_error,
                pin_memory=self.device.type == "cuda",
            )
        self.iteration = 0
        self.overflow_steps = 0
        self.tracker = Tracker.off()
        self.tracking_run_id: str | None = None  # kept in checkpoints: a resumed run continues it
        self.history: list[dict[str, float]] = []
        self._pending: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # steps not read yet
        self.evaluations: list[dict[str, Any]] = []

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks: batch x world size x grad_accum."""
        return self.config.data.batch_size * self.dist.world_size * self.config.optim.grad_accum

    # -- state -----------------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG states and data stream cursors."""
        return {
            "rng": rng_state(self.uda.generator),
            "source_stream": self.source.state_dict(),
            "target_stream": self.target.state_dict() if self.target is not None else None,
        }

    def _student_digests(self) -> list[str]:
        """SHA-256 of the student's parameters on every rank: DDP keeps them equal, and we check it."""
        digest = hashlib.sha256()
        for tensor in self.model.parameters():  # not buffers: each rank's BatchNorm statistics differ
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        digests = gather_objects(self.dist, digest.hexdigest())
        if len(set(digests)) > 1:
            log.error("iteration %d: the student differs between ranks (digests %s)", self.iteration, digests)
        return digests

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (collective under DDP: every rank must call it)."""
        return {
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "model_name": self.config.model.name,
            "uda": self.uda.state_dict(),  # student, teacher, frozen encoder (rank 0's teacher BN stats)
            # under DeepSpeed the optimiser state lives in its shards (see save())
            "optimizer": self.optimizer.state_dict() if self.ds is None else None,
            "engine": self.engine_name,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "overflow_steps": self.overflow_steps,
            "world_size": self.dist.world_size,
            "ranks": gather_objects(self.dist, self._rank_state()),
            "student_digests": self._student_digests(),
            "history": self.history,
            "evaluations": self.evaluations,
            "tracking_run_id": self.tracker.run_id or self.tracking_run_id,
        }

    def load_state_dict(self, state: dict[str, Any], *, where: Path) -> None:
        """Restore :meth:`state_dict`; refuses a checkpoint of another model, config or world size."""
        check_resume(state["config"], self.config, where=where)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise ConfigError(
                f"{where}: written by a run on {saved_world} process(es), resumed on "
                f"{self.dist.world_size}: the data streams and RNG states are per rank, so resume with "
                f"{saved_world} processes (nodes x --nproc_per_node), or start a new run.output_dir"
            )
        saved_engine = state.get("engine", "single" if saved_world == 1 else "ddp")
        if (saved_engine == "deepspeed") != (self.ds is not None):
            raise ConfigError(
                f"{where}: written with dist.engine={saved_engine}, resumed with dist.engine="
                f"{self.engine_name}: the optimiser state is stored differently; resume with the same engine"
            )
        self.uda.load_state_dict(state["uda"])
        if self.ds is not None:
            root = self.output_dir / deepspeed_engine.DEEPSPEED_DIR
            folder = deepspeed_engine.verify_shards(root, state["deepspeed"], where=where)
            self.ds.load_checkpoint(
                str(root), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.dist.rank] if "ranks" in state else state  # single-process format
        set_rng_state(mine["rng"], self.uda.generator)
        self.source.load_state_dict(mine["source_stream"])
        if self.target is not None and mine["target_stream"] is not None:
            self.target.load_state_dict(mine["target_stream"])
        self.iteration = int(state["iteration"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        self.tracking_run_id = state.get("tracking_run_id")

    def save(self) -> Path:
        """Write the checkpoint and the loss history (atomically, rank 0; every rank must call it)."""
        self.flush_metrics()
        path = self.output_dir / CHECKPOINT_NAME
        state = self.state_dict()
        root = self.output_dir / deepspeed_engine.DEEPSPEED_DIR
        if self.ds is not None:
            # Every rank writes its optimiser shard into a fresh folder; checkpoint.pt, renamed into
            # place after all of them, names that folder with checksums: the commit point.
            tag = gather_objects(self.dist, deepspeed_engine.new_tag(self.iteration))[0]
            self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)
            barrier(self.dist)
            if self.dist.is_main:
                state["deepspeed"] = {"tag": tag, "files": deepspeed_engine.file_digests(root / tag)}
        if self.dist.is_main:
            save_checkpoint(path, state)
            atomic_write_bytes(self.output_dir / "history.json", json.dumps(self.history).encode())
            if self.ds is not None:
                deepspeed_engine.remove_other_tags(root, keep=state["deepspeed"]["tag"])
        barrier(self.dist)
        return path

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> dict[str, torch.Tensor]:
        """One optimiser step (``grad_accum`` micro-steps), then the teacher's EMA step.

        Returns the step's metrics as detached device tensors, also queued for :meth:`flush_metrics`:
        nothing here waits for the device, so a GPU runs ahead of the host between log intervals.
        """
        optim = self.config.optim
        factor = lr_factor(self.iteration, warmup=optim.warmup, max_iters=optim.max_iters)
        set_learning_rate(self.optimizer, optim.lr, factor)
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        backward = None
        if self.scaler is not None:
            scaler = self.scaler
            backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731
        elif self.ds is not None:
            engine = self.ds  # accumulates locally (and scales fp16 losses); reduces in step()
            backward = lambda loss: engine.backward(loss, scale_wrt_gas=False)  # noqa: E731
        for micro in range(optim.grad_accum):
            source = to_device(self.source.next(), self.device)
            target = None
            if self.target is not None and self.iteration >= self.config.uda.source_warmup:
                target = to_device(self.target.next(), self.device)
            # DDP averages gradients on the last micro-step only; earlier ones accumulate locally.
            last = micro == optim.grad_accum - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                metrics = self.uda.forward_backward(
                    source, target, backward=backward, scale=1.0 / optim.grad_accum
                )
            for key, value in metrics.items():
                share = value / optim.grad_accum
                totals[key] = totals[key] + share if key in totals else share
        if self.ds is not None:
            totals.update(self._deepspeed_step())
        else:
            totals.update(self._optimizer_step())
        self.uda.update_teacher(self.iteration)
        self._pending.append((self.iteration, optim.lr * factor, totals))
        self.iteration += 1
        return totals

    def flush_metrics(self) -> list[dict[str, float]]:
        """Read the queued steps' metrics into the history: one reduction over the ranks, one transfer.

        Called at log intervals, before checkpoints and at the end. Returns the new history entries.
        """
        if not self._pending:
            return []
        keys = [sorted(values) for _, _, values in self._pending]
        flat = torch.cat(
            [
                torch.stack([values[k].reshape(()).double() for k in names])
                for (_, _, values), names in zip(self._pending, keys, strict=True)
            ]
        )
        numbers = mean_over_ranks(self.dist, flat).tolist()  # the one wait for the device
        entries, position = [], 0
        for (iteration, lr, _), names in zip(self._pending, keys, strict=True):
            entry = dict(zip(names, numbers[position : position + len(names)], strict=True))
            position += len(names)
            if "overflow" in entry:  # fp16: the step was skipped (every rank saw the same gradients)
                if entry.pop("overflow") > 0.5:
                    self.overflow_steps += 1
                    log.warning("iteration %d: fp16 gradient overflow, step skipped", iteration)
                entry["overflow_steps"] = float(self.overflow_steps)
            entry["lr"], entry["iteration"] = lr, iteration
            entries.append(entry)
        self._pending.clear()
        self.history.extend(entries)
        return entries

    def _deepspeed_step(self) -> dict[str, torch.Tensor]:
        """DeepSpeed reduces the accumulated gradients, clips, steps (or skips on fp16 overflow)."""
        skipped = self.ds.skipped_steps
        self.ds.step()
        metrics: dict[str, torch.Tensor] = {}
        if self.ds.fp16_enabled():
            skipped_now = float(self.ds.skipped_steps > skipped)
            metrics["overflow"] = torch.tensor(skipped_now, device=self.device)
            scale = float(deepspeed_engine.loss_scale(self.ds) or 1.0)
            metrics["loss_scale"] = torch.tensor(scale, device=self.device)
        if self.config.optim.grad_clip is not None and self.ds.get_global_grad_norm() is not None:
            metrics["grad_norm"] = torch.tensor(float(self.ds.get_global_grad_norm()), device=self.device)
        return metrics

    def _optimizer_step(self) -> dict[str, torch.Tensor]:
        """Clip (unscaled), step (GradScaler skips overflowing fp16 steps), zero the gradients."""
        optim = self.config.optim
        totals: dict[str, torch.Tensor] = {}
        if self.scaler is not None and optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
        if optim.grad_clip is not None:
            totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), optim.grad_clip
            ).detach()
        if self.scaler is not None:
            # GradScaler.get_scale() reads the scale on the host; its tensor tells the same without waiting
            before = self.scaler._scale.detach().clone()
            self.scaler.step(self.optimizer)  # skips the step when a gradient is inf/NaN
            self.scaler.update()
            totals["overflow"] = (self.scaler._scale < before).float().reshape(())
            totals["loss_scale"] = self.scaler._scale.detach().clone().reshape(())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def evaluate(self) -> SegmentationScores | None:
        """Score the student (or the teacher, with eval.teacher) on the target test set."""
        if self.test_set is None:
            return None
        model = self.eval_model
        result = evaluate(
            model,
            self.test_set,
            num_classes=self.config.model.num_classes,
            batch_size=self.config.eval.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            reduce=lambda matrix: sum_over_ranks(self.dist, matrix),
            autocast=self.autocast,
        )
        self.evaluations.append(
            {
                "iteration": self.iteration,
                "miou": result.miou,
                "accuracy": result.accuracy,
                "iou": list(result.iou),
            }
        )
        self.tracker.log_metrics(tracking.eval_metrics(result), step=self.iteration)
        log.info(
            "iteration %d: target mIoU %.2f, accuracy %.2f (%s)",
            self.iteration,
            100 * result.miou,
            100 * result.accuracy,
            "student" if model is self.model else "teacher",
        )
        return result

    def run(self, *, resume: bool | str = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``optim.max_iters``, or stop (with a checkpoint) once iteration ``stop_after`` is done.

        ``resume``: False starts a new run (an existing checkpoint is an error); True continues from the
        checkpoint (a missing one is an error); ``"auto"`` continues when a checkpoint exists and starts
        fresh otherwise (job scripts whose first attempt and requeues run the same command).
        """
        try:
            with StopRequest(self.dist) as stop:
                result = self._run(resume=resume, stop_after=stop_after, stop=stop)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        if result.iterations >= self.config.optim.max_iters:
            self.tracker.finish("FINISHED")
        else:  # --stop-after or a stop request: a later job continues it (--resume), same run id
            self.tracker.set_tags({"damformer.stopped_at": str(result.iterations)})
            self.tracker.finish("KILLED")
        return result

    def _start_tracking(self) -> None:
        hostnames = gather_objects(self.dist, hostname())  # collective: every rank calls it
        if not (self.dist.is_main and self.config.log.tracking):
            return
        self.tracker = tracking.start_tracking(
            self.config,
            self.output_dir,
            run_id=self.tracking_run_id,
            engine=self.engine_name,
            world_size=self.dist.world_size,
            hostnames=hostnames,
        )
        self.tracking_run_id = self.tracker.run_id or self.tracking_run_id

    def _report_end(self, scores: SegmentationScores) -> None:
        """Rank 0: scores.json, the figures, and the run's artifacts on the tracking server."""
        atomic_write_bytes(
            self.output_dir / "scores.json",
            json.dumps(scores.to_json(iteration=self.iteration, seed=self.config.run.seed)).encode(),
        )
        figures = tracking.write_figures(
            self.eval_model,
            self.test_set,
            scores,
            self.output_dir,
            patches=self.config.log.mosaic_patches,
            autocast=self.autocast,
            title=f"{tracking.run_name(self.config)}: target test, mIoU {100 * scores.miou:.2f}",
        )
        for path in figures:
            self.tracker.log_artifact(path, "figures")
        self.tracker.log_artifact(self.output_dir / "config.yaml")
        self.tracker.log_artifact(self.output_dir / "history.json")
        self.tracker.log_artifact(self.output_dir / CHECKPOINT_NAME, "checkpoint")

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network scored on the target: the student, or the EMA teacher with eval.teacher."""
        return self.uda.teacher.model if (self.config.eval.teacher and self.uda.teacher) else self.model

    def _run(self, *, resume: bool | str, stop_after: int | None, stop: StopRequest) -> TrainResult:
        config = self.config
        checkpoint = self.output_dir / CHECKPOINT_NAME
        if self.dist.is_main and self.output_dir.is_dir():
            for stale in remove_stale_temporaries(self.output_dir):
                log.warning("removed %s: a checkpoint write that was cut off (never read)", stale)
        if resume and checkpoint.is_file():
            self.load_state_dict(load_checkpoint(checkpoint), where=checkpoint)
            log.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        elif resume == "auto":
            log.info("no checkpoint in %s yet: starting fresh (--auto-resume)", self.output_dir)
        elif resume:
            raise ConfigError(
                f"{checkpoint}: no checkpoint to resume from (the run never saved one, or this is another "
                "folder); drop --resume to start this run, or use --auto-resume in job scripts whose first "
                "attempt starts fresh"
            )
        elif checkpoint.is_file():
            raise ConfigError(
                f"{checkpoint} exists: pass --resume to continue it, or choose another run.output_dir"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_config(config, self.output_dir / "config.yaml")
        self._start_tracking()
        log.info(
            "%d process(es) on %s, %s; global batch %d = %d per rank x %d rank(s) x %d accumulation",
            self.dist.world_size,
            self.device.type,
            config.run.precision,
            self.global_batch,
            config.data.batch_size,
            self.dist.world_size,
            config.optim.grad_accum,
        )
        end = config.optim.max_iters if stop_after is None else min(config.optim.max_iters, stop_after)
        started, first = time.perf_counter(), self.iteration
        steps = range(self.iteration, end)
        saved_at_end = self.iteration > 0  # the checkpoint on disk holds the current state (resumed)
        if self.dist.is_main:  # one progress bar per job, not per rank
            steps = progress(steps, desc="train", unit="it", total=end - self.iteration)
        for _ in steps:
            self.step()
            done = self.iteration
            logging_now = _due(done, config.log.interval) or done == end
            if logging_now:
                metrics = self.flush_metrics()[-1]
                rate = (done - first) / max(time.perf_counter() - started, 1e-9)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("iteration",))
                log.info("it %d/%d %s (%.2f it/s)", done, config.optim.max_iters, shown, rate)
                system = tracking.system_metrics(
                    samples_per_second=rate * self.global_batch, device=self.device
                )
                logged = {k: v for k, v in metrics.items() if k != "iteration"}
                self.tracker.log_metrics({**logged, **system}, step=done)
            if _due(done, config.eval.interval) and done < config.optim.max_iters:
                self.evaluate()
            saved = False
            if _due(done, config.log.checkpoint_interval) or done == end:
                self.save()
                saved = True
            saved_at_end = saved
            # Ranks agree on a stop with a collective: every step on one process (nothing to agree on),
            # every STOP_CHECK_STEPS steps and at log intervals under DDP (no sync in between).
            if (not self.dist.enabled or logging_now or done % STOP_CHECK_STEPS == 0) and stop.requested():
                reason = stop.reason() or "a request on another rank"
                if not saved:
                    self.save()
                log.warning(
                    "stopped at iteration %d on request (%s): checkpoint written, continue with --resume",
                    done,
                    reason,
                )
                self.flush_metrics()
                return TrainResult(self.output_dir, self.iteration, self.history, None, stopped=reason)
        scores = None
        if self.iteration >= config.optim.max_iters:
            # The training is on disk before the final evaluation: if the evaluation fails (a corrupt
            # test shard), --resume only evaluates again. Saved again afterwards to record the scores.
            if not saved_at_end:
                self.save()
            scores = self.evaluate()
            if scores is not None:
                self.save()
            if scores is not None and self.dist.is_main:
                self._report_end(scores)
        return TrainResult(self.output_dir, self.iteration, self.history, scores)
