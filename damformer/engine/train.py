"""The training loop: data streams, UDA step, strategy (one process, DDP, DeepSpeed), evaluation, checkpoints.

    damformer train configs/demo/damformer.yaml                # runs/... as set in the config
    damformer train configs/demo/damformer.yaml --resume       # continue from OUTPUT/checkpoint.pt
    torchrun --nproc_per_node=4 -m damformer train CONFIG      # DDP, one process per GPU

The loop knows nothing of DDP or DeepSpeed: the strategy (:mod:`damformer.engine.strategies.base`) wraps the
student and owns backward, the optimiser step and the optimiser's state. Everything that must survive
a restart is in the checkpoint: student, teacher, optimiser, loss scale, iteration, RNG states, and
the data streams' positions, counted in global samples (the same on every rank). So a resumed run
continues exactly, and one resumed on another number of processes continues the same sample sequence,
keeping the global batch (data.batch_size x processes x gradient accumulation) by adjusting the
accumulation. Metrics stay on the device and are read once per log interval.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damformer.atomic import atomic_write_bytes
from damformer.config import ConfigError, RunConfig, check_resume, dump_config
from damformer.config.batch import BatchPlan, keep_global_batch, plan_batch, warn_if_unstated
from damformer.engine.data import open_shard_sets, training_streams
from damformer.engine.metrics import IntervalCursor, MetricsQueue, interval_means, metric_interval
from damformer.engine.optim import lr_factor, set_learning_rate
from damformer.engine.stop import StopRequest
from damformer.engine.strategies import build_strategy
from damformer.errors import DivergedError
from damformer.eval import report
from damformer.eval.evaluate import evaluate, to_device
from damformer.eval.metrics import SegmentationScores
from damformer.models.factory import build_model
from damformer.progress import progress
from damformer.runtime.artifacts import (
    DEEPSPEED_RECORD,
    RunFolder,
    load_checkpoint,
    resume_point,
    rng_state,
    run_folder_lock,
    save_checkpoint,
    set_rng_state,
)
from damformer.runtime.cpu_memory import retain_freed_memory
from damformer.runtime.device import amp_context, resolve_device
from damformer.runtime.distributed import DistContext, barrier, gather_objects, sum_over_ranks
from damformer.shards.shardset import ShardSet
from damformer.tracking import training as tracking
from damformer.tracking.mlflow_tracker import Tracker, git_commit, hostname
from damformer.uda.dacs import SelfTraining

log = logging.getLogger(__name__)
STOP_CHECK_STEPS = 10  # under DDP, the ranks agree on stop requests this often (and at log intervals)


def _due(iteration: int, interval: int) -> bool:
    """Whether a periodic action with this interval falls on ``iteration`` (interval 0: never)."""
    return interval > 0 and iteration % interval == 0


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    scores: SegmentationScores | None = None
    stopped: str | None = None  # why the run stopped early on request (a signal, the stop file)


class Trainer:
    """One training run, on one process or as one rank of a data-parallel job.

    Args:
        config: the validated run config.
        dist: this process's place among the ranks (:func:`damformer.runtime.distributed.init_distributed`);
            None: a single process.
    """

    def __init__(self, config: RunConfig, dist: DistContext | None = None) -> None:
        self.dist = dist or DistContext()
        # The config as stated (config.yaml, checkpoints, resume checks) and as run: the batch keys
        # resolved for this number of processes, before anything is built (a refusal costs nothing).
        self.stated_config, self.config = config, copy.deepcopy(config)
        self.batch = plan_batch(
            global_batch=config.data.global_batch, batch_size=config.data.batch_size,
            grad_accum=config.optim.grad_accum, world_size=self.dist.world_size,
        )  # fmt: skip
        self._use_batch(self.batch)
        config, rank = self.config, self.dist.rank
        self.output_dir = Path(config.run.output_dir)
        self.device = resolve_device(config.run.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        retain_freed_memory(self.device)  # on CPU: no page faults on activations at every step
        self.autocast, scaler = amp_context(config.run.precision, self.device)
        sets = open_shard_sets(config)
        self.source_set, self.target_set = sets["source"], sets["target"]
        self.test_set, self.val_set = sets["target_test"], sets["target_val"]
        stats = [m.get("band_stats", {}).get("s2") for m in self.source_set.manifests]
        means = np.mean([s["mean"] for s in stats], axis=0) if stats and all(stats) else None
        self.s2_mean = None if means is None else [float(v) for v in means]  # plain floats: weights-only load
        for role in ("source", "target"):
            samples = sets[role].num_samples if sets[role] is not None else self.batch.global_batch
            if self.batch.global_batch > samples:
                log.warning(
                    "data.global_batch %d is larger than the %d samples of data.%s: each step takes some of "
                    "them twice (more than an epoch per step); lower data.global_batch",
                    self.batch.global_batch, samples, role,
                )  # fmt: skip
        torch.manual_seed(config.run.seed)  # the same initial weights on every rank
        model = build_model(config.model)
        if config.dist.sync_bn and self.dist.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if config.run.channels_last:
            self.model.to(memory_format=torch.channels_last)  # the teacher, a copy, inherits it
        torch.manual_seed(config.run.seed + 1_000_003 * rank)  # dropout / drop-path differ per rank
        self.uda = SelfTraining(self.model, config.uda, seed=config.run.seed + 7919 * rank).to_device(
            self.device
        )
        self.uda.autocast = self.autocast
        self.strategy = build_strategy(
            self.model, config, dist=self.dist, device=self.device, scaler=scaler,
            unused_parameters=self.uda.leaves_parameters_unused,
        )  # fmt: skip
        self.uda.use_student_forward(self.strategy.forward)
        if config.run.compile:
            self.uda.compile(config.run.compile_backend)
        pin = self.device.type == "cuda"  # page-locked batches: non-blocking copies
        self.source, self.target = training_streams(
            config, self.source_set, self.target_set, dist=self.dist, pin_memory=pin
        )
        self.iteration = 0
        self.tracker = Tracker.off()
        self.tracking_run_id: str | None = None  # kept in checkpoints: a resumed run continues it
        self.git_commit = git_commit()
        self.saved_iteration: int | None = None  # of the checkpoint on disk (a diverged run names it)
        self.history: list[dict[str, float]] = []
        self.metrics = MetricsQueue(self.dist)  # step metrics on the device, read at log intervals
        self.evaluations: list[dict[str, Any]] = []

    @property
    def metric_interval(self) -> int:
        """Iterations per tracked point: ``log.metric_interval``, else about 100 points a run."""
        return metric_interval(
            configured=self.config.log.metric_interval, max_iters=self.config.optim.max_iters
        )

    @property
    def global_batch(self) -> int:
        """Source samples per optimiser step over all ranks: batch x world size x grad_accum."""
        return self.batch.global_batch

    def _use_batch(self, plan: BatchPlan) -> None:
        """Run with ``plan``: the per-process batch and accumulation of the config as run."""
        self.batch = plan
        self.config.data.batch_size, self.config.optim.grad_accum = plan.micro_batch, plan.accumulation

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (collective under DDP: every rank must call it)."""
        digests = self.strategy.replica_digests()
        if len(set(digests)) > 1:
            log.error("iteration %d: the student differs between ranks (digests %s)", self.iteration, digests)
        return {
            "iteration": self.iteration,
            "config": self.stated_config.to_dict(),
            "model_name": self.config.model.name,
            "uda": self.uda.state_dict(),  # student, teacher, frozen encoder (rank 0's teacher BN stats)
            **self.strategy.state_dict(),  # optimiser and loss scale (DeepSpeed: in its shards)
            "engine": self.strategy.name,
            "overflow_steps": self.metrics.overflow_steps,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "rng": gather_objects(self.dist, rng_state(self.uda.generator)),  # per rank
            "streams": {
                "source": self.source.state_dict(),
                "target": self.target and self.target.state_dict(),
            },
            "student_digests": digests,
            "history": self.history,
            "evaluations": self.evaluations,
            "tracking_run_id": self.tracker.run_id or self.tracking_run_id,
            "s2_mean": self.s2_mean,  # of the source shards: predict checks a stack's scale against it
            "git_commit": self.git_commit,  # the code that trained it (model cards)
        }

    def load_state_dict(self, state: dict[str, Any], *, where: Path) -> None:
        """Restore :meth:`state_dict`; refuses another model or config, and a global batch it cannot keep."""
        check_resume(state["config"], self.stated_config, where=where)
        saved_world = int(state.get("world_size", 1))
        if (reason := self.strategy.refuse_resume(state.get("engine", "single"), saved_world)) is not None:
            raise ConfigError(f"{where}: {reason}")
        self._use_batch(
            keep_global_batch(self.batch, int(state["global_batch"]), engine=self.strategy.name, where=where)
        )
        self.uda.load_state_dict(state["uda"])
        self.strategy.load_state_dict(state, where=where, output_dir=self.output_dir)
        if saved_world == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank], self.uda.generator)
        else:  # each rank's draws (dropout, ClassMix) restart from its own seed and the iteration
            log.warning("resumed on %d process(es) from %d: random draws differ from an uninterrupted run",
                        self.dist.world_size, saved_world)  # fmt: skip
            torch.manual_seed(self.config.run.seed + 1_000_003 * self.dist.rank + int(state["iteration"]))
        self.source.load_state_dict(state["streams"]["source"])
        if self.target is not None and state["streams"]["target"] is not None:
            self.target.load_state_dict(state["streams"]["target"])
        self.iteration = int(state["iteration"])
        self.metrics.overflow_steps = int(state.get("overflow_steps", 0))
        self.history, self.evaluations = list(state["history"]), list(state["evaluations"])
        self.tracking_run_id = state.get("tracking_run_id")

    def save(self) -> Path:
        """Write the checkpoint and the loss history (atomically, rank 0; every rank must call it).

        Never with non-finite losses or weights: the last good checkpoint stays (DivergedError).
        """
        self.flush_metrics()
        if not self._weights_finite():  # every rank holds the same student (DDP): all raise together
            self._diverged(f"a weight of the student is not finite after iteration {self.iteration}")
        state, folder = self.state_dict(), RunFolder(self.output_dir)
        record = self.strategy.save_shards(self.output_dir, self.iteration)  # DeepSpeed's, before the commit
        if self.dist.is_main:
            if record is not None:
                state[DEEPSPEED_RECORD] = record
            save_checkpoint(folder.checkpoint, state)
            atomic_write_bytes(folder.history, json.dumps(self.history).encode())
            self.strategy.after_save(self.output_dir, record)
        barrier(self.dist)
        self.saved_iteration = self.iteration
        return folder.checkpoint

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> dict[str, torch.Tensor]:
        """One optimiser step (``grad_accum`` micro-steps), then the teacher's EMA step.

        Returns the metrics as detached device tensors, also queued for :meth:`flush_metrics`: nothing
        here waits for the device, so a GPU runs ahead of the host between log intervals.
        """
        optim = self.config.optim
        factor = lr_factor(self.iteration, warmup=optim.warmup, max_iters=optim.max_iters)
        set_learning_rate(self.strategy.optimizer, optim.lr, factor)
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(optim.grad_accum):
            source = to_device(self.source.next(), self.device)
            target = None
            if self.target is not None and self.iteration >= self.config.uda.source_warmup:
                target = to_device(self.target.next(), self.device)
            with self.strategy.accumulating(last=micro == optim.grad_accum - 1):
                metrics = self.uda.forward_backward(
                    source, target, backward=self.strategy.backward, scale=1.0 / optim.grad_accum
                )
            for key, value in metrics.items():
                share = value / optim.grad_accum
                totals[key] = totals[key] + share if key in totals else share
        totals.update(self.strategy.step())
        self.uda.update_teacher(self.iteration)
        self.metrics.add(self.iteration, optim.lr * factor, totals)
        self.iteration += 1
        return totals

    def flush_metrics(self) -> list[dict[str, float]]:
        """Read the queued steps' metrics into the history (collective: every rank calls it).

        Raises:
            DivergedError: a loss is NaN or infinite (averaged over the ranks: every rank raises).
        """
        entries = self.metrics.flush()
        for entry in entries:
            bad = sorted(k for k, v in entry.items() if k.startswith("loss_") and not math.isfinite(v))
            if bad:
                self._diverged(f"{bad[0]} is {entry[bad[0]]} at iteration {int(entry['iteration']) + 1}")
        self.history.extend(entries)
        return entries

    def _diverged(self, what: str) -> None:
        folder = RunFolder(self.output_dir)
        kept = (
            f"the last good checkpoint, {folder.checkpoint} (iteration {self.saved_iteration}), is kept"
            if self.saved_iteration is not None
            else "no checkpoint was written"
        )
        message = f"training diverged: {what}; stopped, {kept}"
        if self.dist.is_main:  # compare and study list the run as failed, with why
            record = {"reason": message, "iteration": self.iteration}
            atomic_write_bytes(folder.failure, json.dumps(record).encode())
        raise DivergedError(f"{message}. Lower optim.lr, set optim.grad_clip, or use run.precision=fp32")

    def _weights_finite(self) -> bool:
        """Whether every student weight is finite (one reduction, read once: at checkpoint time)."""
        checks = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(checks).all())

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network scored on the target: the student, or the EMA teacher with eval.teacher."""
        return self.uda.teacher.model if (self.config.eval.teacher and self.uda.teacher) else self.model

    def evaluate(self, shard_set: ShardSet | None = None) -> SegmentationScores | None:
        """Score the student (or the teacher, with eval.teacher) on the target test set (or ``shard_set``)."""
        if shard_set is not None:
            return self._score(shard_set)
        if self.test_set is None:
            return None
        result = self._score(self.test_set)
        record = {"iteration": self.iteration, "miou": result.miou, "accuracy": result.accuracy}
        self.evaluations.append({**record, "iou": list(result.iou)})
        self.tracker.log_metrics(tracking.eval_metrics(result), step=self.iteration)
        log.info("iteration %d: target mIoU %.2f, accuracy %.2f (%s)", self.iteration, 100 * result.miou,
                 100 * result.accuracy, "teacher" if self.config.eval.teacher else "student")  # fmt: skip
        return result

    def _score(self, shard_set: ShardSet) -> SegmentationScores:
        return evaluate(
            self.eval_model, shard_set, num_classes=self.config.model.num_classes,
            batch_size=self.config.eval.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            reduce=lambda matrix: sum_over_ranks(self.dist, matrix), autocast=self.autocast,
        )  # fmt: skip

    def run(self, *, resume: bool | str = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``optim.max_iters``, or stop (with a checkpoint) once iteration ``stop_after`` is done.

        ``resume``: False starts a new run (an existing checkpoint is an error); True continues from the
        checkpoint (a missing one is an error); ``"auto"`` continues when a checkpoint exists and starts
        fresh otherwise (job scripts whose first attempt and requeues run the same command).
        """
        lock = run_folder_lock(self.output_dir) if self.dist.is_main else contextlib.nullcontext()
        try:
            with lock, StopRequest(self.dist) as stop:  # one training per run folder
                result = self._run(resume=resume, stop_after=stop_after, stop=stop)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        finally:
            self.strategy.close()
        if result.iterations >= self.config.optim.max_iters:
            self.tracker.finish("FINISHED")
        else:  # --stop-after or a stop request: a later job continues it (--resume), same run id
            self.tracker.set_tags({"damformer.stopped_at": str(result.iterations)})
            self.tracker.finish("KILLED")
        return result

    def _open(self, resume: bool | str) -> None:
        """Resume (or refuse to), write the config, start tracking: everything before the first step."""
        checkpoint = resume_point(self.output_dir, resume, clean=self.dist.is_main)
        if checkpoint is not None:
            self.load_state_dict(load_checkpoint(checkpoint), where=checkpoint)
            log.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            dump_config(self.stated_config, RunFolder(self.output_dir).config)
            RunFolder(self.output_dir).failure.unlink(missing_ok=True)  # this attempt may well succeed
        hostnames = gather_objects(self.dist, hostname())  # collective: every rank calls it
        if self.dist.is_main and self.config.log.tracking:
            self.tracker = tracking.start_tracking(
                self.config, self.output_dir, run_id=self.tracking_run_id, engine=self.strategy.name,
                world_size=self.dist.world_size, hostnames=hostnames,
            )  # fmt: skip
            self.tracking_run_id = self.tracker.run_id or self.tracking_run_id
        log.info("%d process(es) on %s, %s; %s", self.dist.world_size, self.device.type,
                 self.config.run.precision, self.batch.describe())  # fmt: skip
        warn_if_unstated(self.batch)

    def _report(self, scores: SegmentationScores, validation: SegmentationScores | None) -> None:
        """Rank 0 at the end: scores.json and the figures into the run folder, then them to the tracker."""
        folder, config, iteration = RunFolder(self.output_dir), self.config, self.iteration
        report.write_scores(folder, scores, iteration=iteration, seed=config.run.seed, validation=validation)
        title = f"{tracking.run_name(config)}: target test, mIoU {100 * scores.miou:.2f}"
        figures = report.write_figures(
            self.eval_model, self.test_set, scores, self.output_dir, patches=config.log.mosaic_patches,
            autocast=self.autocast, title=title,
        )  # fmt: skip
        tracking.log_run_end(
            config, folder, self.tracker, figures=figures, iteration=self.iteration, validation=validation
        )

    def _run(self, *, resume: bool | str, stop_after: int | None, stop: StopRequest) -> TrainResult:
        config = self.config
        self._open(resume)
        end = config.optim.max_iters if stop_after is None else min(config.optim.max_iters, stop_after)
        started, first = time.perf_counter(), self.iteration
        steps = range(self.iteration, end)
        if self.dist.is_main:  # one progress bar per job, not per rank
            steps = progress(steps, desc="train", unit="it", total=end - self.iteration)
        console, plot = IntervalCursor(len(self.history)), IntervalCursor(len(self.history))
        saved_at_end = self.iteration > 0  # the checkpoint on disk holds the current state (resumed)
        self.saved_iteration = self.iteration if saved_at_end else None
        for _ in steps:
            self.step()
            done = self.iteration
            logging_now = _due(done, config.log.interval) or done == end
            plotting_now = _due(done, self.metric_interval) or done == end
            if logging_now or plotting_now or self.device.type == "cpu":  # a CPU reads for free: every step
                self.flush_metrics()  # a diverged loss stops the run here
            rate = (done - first) / max(time.perf_counter() - started, 1e-9)
            if logging_now:  # the console and the tracker show interval means, not a single batch
                means = interval_means(console.take(self.history))
                shown = " ".join(f"{k} {v:.4g}" for k, v in means.items())
                log.info("it %d/%d %s (%.2f it/s)", done, config.optim.max_iters, shown, rate)
            if plotting_now:
                system = tracking.system_metrics(
                    samples_per_second=rate * self.global_batch, device=self.device
                )
                self.tracker.log_metrics({**interval_means(plot.take(self.history)), **system}, done)
            if _due(done, config.eval.interval) and done < config.optim.max_iters:
                self.evaluate()
            saved_at_end = _due(done, config.log.checkpoint_interval) or done == end
            if saved_at_end:
                self.save()
            # Ranks agree on a stop with a collective: every step on one process (nothing to agree on),
            # every STOP_CHECK_STEPS steps and at log intervals under DDP (no sync in between).
            if (not self.dist.enabled or logging_now or done % STOP_CHECK_STEPS == 0) and stop.requested():
                reason = stop.reason() or "a request on another rank"
                if not saved_at_end:
                    self.save()
                log.warning("stopped at iteration %d on request (%s): checkpoint written, --resume goes on",
                            done, reason)  # fmt: skip
                return TrainResult(self.output_dir, self.iteration, self.history, None, stopped=reason)
        scores = None
        if self.iteration >= config.optim.max_iters:
            # The training is on disk before the final evaluation: if the evaluation fails (a corrupt
            # test shard), --resume only evaluates again. Saved again afterwards to record the scores.
            if not saved_at_end:
                self.save()
            scores = self.evaluate()
            validation = self.evaluate(self.val_set) if self.val_set is not None else None
            if validation is not None:
                log.info("target validation mIoU %.2f, accuracy %.2f", 100 * validation.miou,
                         100 * validation.accuracy)  # fmt: skip
            if scores is not None:
                self.save()
            if scores is not None and self.dist.is_main:
                self._report(scores, validation)
        return TrainResult(self.output_dir, self.iteration, self.history, scores)
