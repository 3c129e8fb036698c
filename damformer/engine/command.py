"""``damformer train``: one training run, or (``--dry-run``) what it would train and how its batch splits."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from damformer.atomic import check_writable_folder
from damformer.config import RunConfig, load_config
from damformer.config.batch import BatchPlan, plan_batch
from damformer.errors import EXIT_STOPPED, OptionError
from damformer.runtime.device import resolve_device
from damformer.runtime.distributed import distributed_session
from damformer.tracking.mlflow_tracker import experiment_family

if TYPE_CHECKING:
    from damformer.engine.train import TrainResult


def train_command(args: argparse.Namespace) -> int:
    """Resolve the config (file, overlays, ``--set``, options), then train it or print the plan."""
    from damformer.engine.train import Trainer  # torch and the models: only when training

    if args.stop_after is not None and args.stop_after < 1:
        raise OptionError(f"--stop-after {args.stop_after}: expected an iteration >= 1")
    planning = args.dry_run or args.print_config
    config = load_config(args.config, args.set, overlays=args.overlays, check_files=not planning)
    if args.output_dir is not None:
        config.run.output_dir = str(args.output_dir)
    if not planning:
        option = "--output-dir" if args.output_dir else "run.output_dir"
        check_writable_folder(Path(config.run.output_dir), option)
    if args.tracking_uri is not None:
        config.log.tracking_uri = args.tracking_uri
    if config.log.experiment is None:  # one MLflow experiment per config family (its folder)
        config.log.experiment = experiment_family(args.config)
    if args.print_config:
        return print_config(config, args.world_size)
    if args.dry_run:
        return dry_run(config, args.world_size)
    with distributed_session(resolve_device(config.run.device)) as dist:
        if not dist.is_main:  # one voice per job: other ranks only warn
            logging.getLogger("damformer").setLevel(logging.WARNING)
        trainer = Trainer(config, dist)
        if dist.is_main:
            ranks = f" x {dist.world_size} ranks" if dist.enabled else ""
            print(
                f"training {config.model.name} ({'UDA' if config.uda.enabled else 'source only'}) for "
                f"{config.optim.max_iters} iterations on {trainer.device}{ranks}; "
                f"output: {config.run.output_dir}"
            )
        resume = "auto" if args.auto_resume else args.resume
        result = trainer.run(resume=resume, stop_after=args.stop_after)
        if dist.is_main:
            _say_outcome(trainer.config, result)
        del trainer  # its DDP reducer, loaders and engine go before the process group does
    if result.stopped and "TORCHELASTIC_RUN_ID" not in os.environ:
        # "stopped early, resume me" (EX_TEMPFAIL). Not under torchrun: there a non-zero exit would make
        # it restart the workers, so they exit 0 and slurm/train.sh requeues (it raised the stop itself).
        return EXIT_STOPPED
    return 0


def _say_outcome(config: RunConfig, result: TrainResult) -> None:
    if result.stopped:
        print(
            f"stopped at iteration {result.iterations} of {config.optim.max_iters} on request "
            f"({result.stopped}); the checkpoint is written: continue with --resume"
        )
    if result.scores is not None:
        print(f"target test mIoU {100 * result.scores.miou:.2f}  accuracy {100 * result.scores.accuracy:.2f}")


def _plan(config: RunConfig, world_size: int | None) -> tuple[int, BatchPlan]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size < 1:
        raise OptionError(f"--world-size {world_size}: expected >= 1")
    plan = plan_batch(
        global_batch=config.data.global_batch, batch_size=config.data.batch_size,
        grad_accum=config.optim.grad_accum, world_size=world_size,
    )  # fmt: skip
    return world_size, plan


def print_config(config: RunConfig, world_size: int | None) -> int:
    """The resolved config as YAML (what config.yaml of the run will hold), headed by its batch plan."""
    world_size, plan = _plan(config, world_size)
    print(f"# {config.model.name}; on {world_size} process(es): {plan.describe()}")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def dry_run(config: RunConfig, world_size: int | None) -> int:
    """What the config trains and how its batch splits over ``world_size`` processes, building nothing."""
    world_size, plan = _plan(config, world_size)
    model, uda = config.model, config.uda
    training = "source only"
    if uda.enabled:
        training = "UDA"
        if model.temporal:
            training += f", mixed loss (LR weight {uda.lr_weight:g}), ensemble pseudo-labels "
            training += f"({uda.ensemble}, LR weight {uda.ensemble_lr_weight:g})"
    print(f"model: {model.name} ({model.mit_size if model.arch != 'unet_c' else 'CNN encoder'})")
    if model.temporal:
        print(f"fusion: DTF into encoder level(s) {model.fusion_levels}, zero-init {model.fusion_zero_init}")
    print(f"training: {training}; {config.optim.max_iters} iterations, lr {config.optim.lr:g}")
    print(f"batch on {world_size} process(es): {plan.describe()}")
    print(f"output: {config.run.output_dir}")
    return 0
