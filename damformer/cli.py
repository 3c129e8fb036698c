"""The ``damformer`` command. Subcommands parse arguments and call into the package; no logic lives here.

Errors of our own (:class:`damformer.errors.DamformerError`) and invalid option values are printed as
one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import gc
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from damformer import __version__
from damformer.errors import DamformerError
from damformer.logs import configure_logging, process_rank
from damformer.progress import set_quiet

if TYPE_CHECKING:
    from damformer.config import RunConfig
    from damformer.engine.train import Trainer, TrainResult

log = logging.getLogger("damformer")

EXIT_USAGE = 2
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: stopped on request with a checkpoint; run again with --resume
EXIT_INTERRUPTED = 130


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show informative defaults once, and keep the hand-made line breaks of examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        uninformative = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in help_text.lower() or uninformative or action.option_strings == []:
            return help_text  # the help already says it, or there is nothing to say (flags, None)
        return f"{help_text} (default: %(default)s)"


class _OptionError(Exception):
    """An option value the package rejected (ValueError from an options dataclass)."""


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset layout (defaults: the FLAIR-2 names under --root)")
    group.add_argument(
        "--root",
        "--src",
        dest="root",
        type=Path,
        required=True,
        help="FLAIR-2 folder (real, toy or miniature)",
    )
    group.add_argument(
        "--split",
        choices=["train", "test"],
        default="train",
        help="train: flair_*_train folders; test: flair_2_*_test folders",
    )
    group.add_argument(
        "--domains",
        nargs="+",
        default=None,
        metavar="DOMAIN",
        help="ids (D080_2021), prefixes (D080), presets (north, south) or 'all' (default: all)",
    )
    group.add_argument("--aerial-dir", type=Path, help="aerial folder, if not a standard name")
    group.add_argument("--labels-dir", type=Path, help="labels folder, if not a standard name")
    group.add_argument("--sen-dir", type=Path, help="Sentinel-2 folder, if not a standard name")
    group.add_argument("--centroids-json", type=Path, help="flair-2_centroids_sp_to_patch.json, if elsewhere")
    group.add_argument(
        "--metadata-json", type=Path, help="flair_aerial_metadata.json (or metadata_aerial.json)"
    )
    group.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="expected aerial side in pixels (512 for FLAIR-2); default: any square size",
    )
    group.add_argument("--no-labels", action="store_true", help="do not read labels (unlabelled target)")
    group.add_argument("--no-s2", action="store_true", help="do not read Sentinel-2 (aerial-only)")

    s2 = parser.add_argument_group("Sentinel-2 (defaults: the FLAIR-2 baseline's)")
    s2.add_argument(
        "--sat-size", type=int, default=40, help="side of the crop around the centroid, S2 pixels"
    )
    s2.add_argument("--no-cloud-filter", action="store_true", help="keep cloudy and snowy dates")
    s2.add_argument(
        "--mask-threshold",
        type=int,
        default=60,
        help="a pixel is cloudy/snowy when its mask probability is >= this (0..100)",
    )
    s2.add_argument(
        "--max-cover",
        type=float,
        default=0.5,
        help="keep a date when (snowy + cloudy pixels) / crop area < this",
    )
    s2.add_argument(
        "--no-monthly", action="store_true", help="keep individual dates instead of monthly means"
    )
    s2.add_argument(
        "--no-clear-date",
        choices=["least_cloudy", "error"],
        default="least_cloudy",
        help="what to do when every date of a patch is cloudy",
    )


def _dataset_from_args(args: argparse.Namespace):  # noqa: ANN202 (import kept lazy: torch-free CLI start)
    from damformer.data import Flair2Dataset, SentinelOptions

    try:
        sentinel = SentinelOptions(
            crop_size=args.sat_size,
            cloud_filter=not args.no_cloud_filter,
            mask_threshold=args.mask_threshold,
            max_cover=args.max_cover,
            monthly_average=not args.no_monthly,
            no_clear_date=args.no_clear_date,
        )
    except ValueError as exc:
        raise _OptionError(str(exc)) from None
    return Flair2Dataset(
        args.root,
        split=args.split,
        domains=args.domains,
        sentinel=sentinel,
        with_labels=not args.no_labels,
        with_s2=not args.no_s2,
        patch_size=args.patch_size,
        aerial_dir=args.aerial_dir,
        labels_dir=args.labels_dir,
        sen_dir=args.sen_dir,
        centroids_json=args.centroids_json,
        metadata_json=args.metadata_json,
    )


def _cmd_synth(args: argparse.Namespace) -> int:
    from damformer.miniature.synth import SynthOptions, generate

    try:
        options = SynthOptions(
            seed=args.seed,
            patch_size=512 if args.full_size else args.patch_size,
            domains_per_region=args.domains_per_region,
            zones_per_domain=args.zones_per_domain,
            test_zones_per_domain=args.test_zones_per_domain,
            patches_per_zone=args.patches_per_zone,
        )
    except ValueError as exc:
        raise _OptionError(str(exc)) from None
    info = generate(args.out, options, overwrite=args.overwrite)
    counts = ", ".join(f"{key}: {value}" for key, value in sorted(info["patches"].items()))
    print(f"miniature FLAIR-2 written to {args.out} ({counts} patches of {options.patch_size} px)")
    print(
        f"south domains: {' '.join(info['regions']['south'])}; "
        f"north domains: {' '.join(info['regions']['north'])}"
    )
    return 0


def _cmd_read(args: argparse.Namespace) -> int:
    from damformer.data.summary import format_summary, summarize

    dataset = _dataset_from_args(args)
    print(f"{args.root} [{args.split}]: {len(dataset)} patches in {len(dataset.domains)} domains")
    print(format_summary(summarize(dataset)))
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from damformer.shards.writer import ShardWriteOptions, parse_size, write_shards

    try:
        options = ShardWriteOptions(
            max_samples=args.max_samples, shard_bytes=parse_size(args.shard_size), workers=args.workers
        )
    except ValueError as exc:
        raise _OptionError(str(exc)) from None
    dataset = _dataset_from_args(args)
    manifest = write_shards(dataset, args.out, options, overwrite=args.overwrite)
    size = sum(shard["bytes"] for shard in manifest["shards"])
    print(
        f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({size / 1e6:.1f} MB) over domains {' '.join(manifest['domains'])}; "
        f"{manifest['written']} written, {len(manifest['shards']) - manifest['written']} already complete"
    )
    return 0


def _cmd_shard_verify(args: argparse.Namespace) -> int:
    from damformer.shards.writer import verify_shards

    for folder in args.dirs:
        result = verify_shards(folder)
        print(f"{folder}: OK, {result['samples']} samples in {result['shards']} shards, checksums match")
    return 0


def _add_shard_parsers(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard",
        formatter_class=_Formatter,
        help="write a FLAIR-2 selection as WebDataset tar shards ('shard verify DIR' checks a set)",
        description="Write one sample per aerial patch (aerial bands, label, Sentinel-2 crop already cloud-"
        "filtered and month-averaged, dates, CRS/transform) into per-domain tar shards, with a "
        "manifest (counts, sha256, class pixel counts, band statistics). Re-running resumes: complete, "
        "verified shards are skipped. 'damformer shard verify DIR [DIR ...]' re-checks sizes, "
        "checksums and decodes every sample.",
        epilog="examples:\n"
        "  damformer shard --src /data/FLAIR2 --domains south --out shards/south --workers 8\n"
        "  damformer shard --src /data/FLAIR2 --domains north --split test --out shards/north-test\n"
        "  damformer shard verify shards/south shards/north-test",
    )
    _add_dataset_arguments(shard)
    out = shard.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="shard-set folder (one per source/target set)")
    out.add_argument(
        "--shard-size", default="1GB", help="upper bound of a shard's size (1GB, 512MiB, 200MB, bytes)"
    )
    out.add_argument("--max-samples", type=int, default=1000, help="upper bound of samples per shard")
    out.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    out.add_argument(
        "--overwrite", action="store_true", help="replace a shard set that was made with other parameters"
    )
    shard.set_defaults(run=_cmd_shard)

    verify = commands.add_parser(
        "shard-verify",
        formatter_class=_Formatter,
        help="same as 'shard verify DIR': re-check shard sets (counts, sha256, every sample decodes)",
        description="Re-check shard sets: every shard listed in the manifest is present with the recorded "
        "size and sha256, and every sample decodes and is listed in order.",
        epilog="example:\n  damformer shard verify shards/south shards/north",
    )
    verify.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="shard-set folders")
    verify.set_defaults(run=_cmd_shard_verify)


def _cmd_train(args: argparse.Namespace) -> int:
    from damformer.config import load_config
    from damformer.engine.train import Trainer
    from damformer.runtime.device import resolve_device
    from damformer.runtime.distributed import init_distributed, teardown
    from damformer.tracking.mlflow_tracker import experiment_family

    if args.stop_after is not None and args.stop_after < 1:
        raise _OptionError(f"--stop-after {args.stop_after}: expected an iteration >= 1")
    config = load_config(args.config, args.set, overlays=args.overlays, check_files=not args.dry_run)
    if args.output_dir is not None:
        config.run.output_dir = str(args.output_dir)
    if not args.dry_run:
        _writable_folder(Path(config.run.output_dir), "--output-dir" if args.output_dir else "run.output_dir")
    if args.tracking_uri is not None:
        config.log.tracking_uri = args.tracking_uri
    if config.log.experiment is None:  # one MLflow experiment per config family (its folder)
        config.log.experiment = experiment_family(args.config)
    if args.dry_run:
        return _train_dry_run(config, args.world_size)
    dist = init_distributed(resolve_device(config.run.device))
    if not dist.is_main:  # one voice per job: other ranks only warn
        logging.getLogger("damformer").setLevel(logging.WARNING)
    try:
        result = _train(Trainer(config, dist), args)
    except BaseException:
        teardown(dist, wait=False)  # a failed rank must not wait for peers that may be gone
        raise
    # The trainer (its DDP reducer, loaders, engine) is gone before the process group is: what still
    # refers to a gloo group when the interpreter shuts down can abort the rank at exit
    # ("terminate called without an active exception", seen once in ~5 two-rank test runs).
    gc.collect()
    teardown(dist)
    if result.stopped and "TORCHELASTIC_RUN_ID" not in os.environ:
        # "stopped early, resume me" (EX_TEMPFAIL). Not under torchrun: there a non-zero exit would make
        # it restart the workers, so they exit 0 and slurm/train.sh requeues (it raised the stop itself).
        return EXIT_STOPPED
    return 0


def _train_dry_run(config: RunConfig, world_size: int | None) -> int:
    """``train --dry-run``: what the config trains and how its batch splits, without building anything."""
    from damformer.config.batch import plan_batch

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size < 1:
        raise _OptionError(f"--world-size {world_size}: expected >= 1")
    plan = plan_batch(
        global_batch=config.data.global_batch, batch_size=config.data.batch_size,
        grad_accum=config.optim.grad_accum, world_size=world_size,
    )  # fmt: skip
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


def _train(trainer: Trainer, args: argparse.Namespace) -> TrainResult:
    """Run ``trainer`` as ``damformer train`` asked and print the outcome (rank 0)."""
    config, dist = trainer.config, trainer.dist
    if dist.is_main:
        ranks = f" x {dist.world_size} ranks" if dist.enabled else ""
        print(
            f"training {config.model.name} ({'UDA' if config.uda.enabled else 'source only'}) for "
            f"{config.optim.max_iters} iterations on {trainer.device}{ranks}; "
            f"output: {config.run.output_dir}"
        )
    result = trainer.run(resume="auto" if args.auto_resume else args.resume, stop_after=args.stop_after)
    if result.stopped and dist.is_main:
        print(
            f"stopped at iteration {result.iterations} of {config.optim.max_iters} on request "
            f"({result.stopped}); the checkpoint is written: continue with --resume"
        )
    if result.scores is not None and dist.is_main:
        print(f"target test mIoU {100 * result.scores.miou:.2f}  accuracy {100 * result.scores.accuracy:.2f}")
    return result


def _writable_folder(path: Path, option: str) -> None:
    """``path`` is a folder, or can become one, that this process can write (checked without writing)."""
    if path.exists() and not path.is_dir():
        raise _OptionError(f"{option} {path}: is a file, expected a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:  # a real probe: permission bits say nothing for root, nor for a read-only file system
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".damformer-probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        raise _OptionError(f"{option} {path}: cannot write in {existing} ({exc.strerror})") from None


def _check_predict_options(args: argparse.Namespace) -> int:
    """Option values before anything is loaded; returns the stride."""
    if args.batch_size < 1:
        raise _OptionError(f"--batch-size {args.batch_size}: expected >= 1")
    if args.window < 32 or args.window % 32:
        raise _OptionError(
            f"--window {args.window}: expected a multiple of 32 (the encoder's deepest stride), e.g. "
            f"{max(32, args.window // 32 * 32)} or {max(32, -(-args.window // 32) * 32)}"
        )
    stride = args.stride or max(1, args.window * 3 // 4)
    if not 1 <= stride <= args.window:
        raise _OptionError(f"--stride {stride}: expected 1..--window ({args.window})")
    if args.s2 and not args.s2_dates:
        raise _OptionError("--s2 needs --s2-dates (a text file, one YYYY-MM-DD per line, one per date)")
    missing = [str(path) for path in args.src if not path.exists()]
    if missing:
        raise _OptionError(f"--src: not found: {', '.join(missing)}")
    _writable_folder(args.out, "--out")
    return stride


def _parse_bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 1-based band numbers separated by commas, found {text!r}"
        ) from None


def _cmd_predict(args: argparse.Namespace) -> int:
    from damformer.data.classes import FLAIR_CLASSES
    from damformer.predict.mosaic import MosaicOptions, SentinelStack, check_mosaic, predict_mosaics
    from damformer.predict.run import Outputs, predict_flair2
    from damformer.predict.sliding import PatchPredictor
    from damformer.runtime.artifacts import load_model
    from damformer.runtime.cpu_memory import retain_freed_memory
    from damformer.runtime.device import amp_context, resolve_device
    from damformer.runtime.distributed import init_distributed, sum_over_ranks, teardown

    stride = _check_predict_options(args)
    model, model_config, state = load_model(args.checkpoint, teacher=args.teacher)
    flair2 = len(args.src) == 1 and args.src[0].is_dir()
    stack = SentinelStack.open(args.s2, args.s2_dates, reference=args.s2_reference) if args.s2 else None
    options = MosaicOptions(
        args.window, stride, args.batch_size, stack, bands=args.bands, allow_partial_s2=args.allow_partial_s2
    )
    mosaics = [] if flair2 else [check_mosaic(path, model_config, options) for path in args.src]
    device = resolve_device(args.device)
    retain_freed_memory(device)
    dist = init_distributed(device)
    try:
        autocast, _ = amp_context(args.precision, device)
        predictor = PatchPredictor(model, device, autocast=autocast, flips=args.tta)
        outputs = Outputs(args.out, probabilities=args.probabilities, quicklook=args.quicklook,
                          overwrite=args.overwrite)  # fmt: skip
        if flair2:
            result = predict_flair2(
                args.src[0], model, model_config, outputs, predictor=predictor, split=args.split,
                domains=args.domains, batch_size=args.batch_size, rank=dist.rank, world_size=dist.world_size,
                reduce=lambda matrix: sum_over_ranks(dist, matrix),
            )  # fmt: skip
            if dist.is_main:
                print(f"{model_config.name} (iteration {state['iteration']}): maps in {args.out}")
                if result is not None:
                    print(result.table([c.name for c in FLAIR_CLASSES][: model_config.num_classes]))
        else:
            written = predict_mosaics(
                mosaics, model_config, outputs, options, predictor=predictor, rank=dist.rank,
                world_size=dist.world_size,
            )  # fmt: skip
            for source, path in zip(args.src[dist.rank :: dist.world_size], written, strict=True):
                print(f"{source} -> {path}")
    except BaseException:
        teardown(dist, wait=False)
        raise
    teardown(dist)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from damformer.tracking.compare import format_table, rows_from_folders, rows_from_mlflow

    if bool(args.runs) == bool(args.tracking_uri):
        raise _OptionError("give run folders, or --tracking-uri (with --experiment), not both")
    if args.tracking_uri:
        rows = rows_from_mlflow(args.tracking_uri, args.experiment)
    else:
        rows = rows_from_folders(args.runs)
    print(format_table(rows))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:

    from damformer.data.classes import FLAIR_CLASSES
    from damformer.eval.evaluate import evaluate
    from damformer.runtime.artifacts import load_model
    from damformer.runtime.cpu_memory import retain_freed_memory
    from damformer.runtime.device import resolve_device
    from damformer.shards.shardset import ShardSet

    if args.batch_size < 1:
        raise _OptionError(f"--batch-size {args.batch_size}: expected >= 1")
    # the checkpoint first: a refused one (not weights, or no damformer checkpoint) is the likelier mistake
    model, model_config, state = load_model(args.checkpoint, teacher=args.teacher)
    shard_set = ShardSet(args.shards, domains=args.domains)
    unlabelled = [
        str(f)
        for f, m in zip(args.shards, shard_set.manifests, strict=True)
        if not m["params"]["with_labels"]
    ]
    if unlabelled:
        raise _OptionError(
            f"--shards {', '.join(unlabelled)}: sharded without labels (--no-labels): evaluation needs a "
            "labelled set, e.g. the target's test split"
        )
    device = resolve_device(args.device)
    retain_freed_memory(device)
    model.to(device)
    result = evaluate(
        model, shard_set, num_classes=model_config.num_classes, batch_size=args.batch_size, device=device
    )
    names = [c.name for c in FLAIR_CLASSES][: model_config.num_classes]
    print(f"{model_config.name} at iteration {state['iteration']} on {', '.join(map(str, args.shards))}")
    print(result.table(names))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from damformer.study import command
    from damformer.study.spec import load_study

    study = load_study(args.study, overrides=args.set, output_dir=args.output_dir)
    if args.dry_run or args.slurm_tasks:
        planned = command.plan(study, uri_override=args.tracking_uri, dry_run=args.dry_run)
        if isinstance(planned, Path):  # slurm/study.sh reads "COUNT PATH" from this line
            count = len(json.loads(planned.read_text())["tasks"])
            print(f"{count} {planned}")
        else:
            print("\n".join(planned))
        return 0
    if args.collect:
        report = command.collect(study, uri_override=args.tracking_uri)
    else:
        report = command.run(study, jobs=args.jobs, uri_override=args.tracking_uri)
    print(report.table)
    print(f"written: {', '.join(str(path) for path in report.written)}")
    if report.stopped:
        print(f"stopped on request; {len(report.unfinished())} run(s) left: run the same command to continue")
        return EXIT_STOPPED
    if not report.complete:
        print("not finished: " + "; ".join(report.unfinished()), file=sys.stderr)
        print(
            f"(logs: {study.output_dir}/runs/NAME/seed-S/train.log; the same command retries them)",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_study_parser(commands: argparse._SubParsersAction) -> None:
    study = commands.add_parser(
        "study",
        formatter_class=_Formatter,
        help="run an ablation study: every (config, seed) trained, tracked and compared in one table",
        description="Train every (configuration, seed) of a study file that is not finished yet (a rerun "
        "skips finished runs, resumes interrupted ones from their checkpoint and retries failed ones; a "
        "failed run never stops the others), then write the study's tables (mIoU 13 and 12 classes, "
        "accuracy, IoU per class: mean +- std over seeds; results.md, results.csv, runs.csv) and the "
        "paper-style figure (figure.png) into its output folder. Every training is nested under one "
        "MLflow parent run, which holds the tables and the figure. See configs/studies/ for the format.",
        epilog="examples:\n"
        "  damformer study configs/studies/miniature.yaml --jobs 2\n"
        "  damformer study configs/studies/paper.yaml --dry-run           # commands for another scheduler\n"
        "  damformer study configs/studies/paper.yaml --collect           # tables and figure only\n"
        "  bash slurm/study.sh configs/studies/paper.yaml --partition=gpu # a Slurm job array\n"
        "\nExit: 0 all finished, 1 some failed (their logs are named), 75 stopped on request (rerun).",
    )
    study.add_argument("study", type=Path, help="study file (YAML)")
    study.add_argument("--jobs", type=int, default=1, help="trainings at a time on this machine")
    study.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override every run's config"
    )
    study.add_argument("--output-dir", type=Path, help="override the study's output_dir")
    study.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store or server (default: OUTPUT/mlflow.db)"
    )
    mode = study.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")
    mode.add_argument("--collect", action="store_true", help="only write the tables and figure")
    mode.add_argument(
        "--slurm-tasks", action="store_true", help="write a task file for a Slurm job array (slurm/study.sh)"
    )
    study.set_defaults(run=_cmd_study)


def _cmd_ui(args: argparse.Namespace) -> int:
    from damformer.tracking.ui import serve

    return serve(args.paths or [Path("runs/demo")], host=args.host, port=args.port)


def _add_training_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        formatter_class=_Formatter,
        help="train a model: UDA self-training from source shards to target shards (or source only)",
        description="Train one of the ablation's models from a YAML config (see configs/). Writes the "
        "merged config, checkpoint.pt (student, teacher, optimiser, RNG, data cursors), history.json "
        "and scores.json into run.output_dir. --resume continues exactly where a killed run stopped.",
        epilog="examples:\n"
        "  damformer train configs/demo/damformer.yaml\n"
        "  damformer train configs/demo/damformer.yaml --set optim.max_iters=100 --set uda.enabled=false\n"
        "  damformer train configs/demo/damformer.yaml --resume\n"
        "  damformer train configs/ablation/damformer-rgbne-t.yaml --dry-run --world-size 2"
        "   # the batch on 2 GPUs\n"
        "  damformer train configs/ablation/damformer-rgbne-t.yaml configs/ablation/miniature.yaml"
        "   # an ablation cell on the miniature\n"
        "\nSIGTERM, SIGUSR1 or the file named by DAMFORMER_STOP_FILE stops the run after the current step\n"
        "with a checkpoint: exit code 75 (EX_TEMPFAIL, 'resume me'; 0 under torchrun). Errors: exit 2.",
    )
    train.add_argument("config", type=Path, help="YAML run config")
    train.add_argument(
        "overlays",
        nargs="*",
        type=Path,
        metavar="OVERLAY",
        help="YAML files whose values replace the config's, in order (before --set)",
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    train.add_argument("--output-dir", type=Path, help="override run.output_dir")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt (which must exist)"
    )
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from OUTPUT_DIR/checkpoint.pt if it exists, else start fresh (job scripts: the "
        "first attempt and every requeue or restart run the same command)",
    )
    train.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store or server for this run (log.tracking_uri), e.g. http://127.0.0.1:5000; "
        "default: the run folder's parent's store, sqlite:///PARENT/mlflow.db",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the model, the training and how the global batch splits over --world-size "
        "processes (per-process batch, accumulation), or why it cannot; build and train nothing",
    )
    train.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="processes to plan the batch for, with --dry-run (default: $WORLD_SIZE, else 1)",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="ITER",
        help="stop with a checkpoint once iteration ITER is done (the schedule still ends at "
        "optim.max_iters): split a run over time-limited jobs, continue with --resume",
    )
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        help="score a checkpoint on labelled shards (per-class IoU, mIoU, accuracy)",
        description="Evaluate the student (or --teacher) of a checkpoint on labelled shard sets: IoU per "
        "class accumulated over the whole set, mIoU over the classes present, overall accuracy.",
        epilog="example:\n  damformer evaluate --checkpoint runs/demo/damformer/checkpoint.pt "
        "--shards runs/demo/shards/north-test",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of a run")
    evaluate.add_argument("--shards", type=Path, nargs="+", required=True, help="labelled shard sets")
    evaluate.add_argument("--domains", nargs="+", help="restrict to these domains")
    evaluate.add_argument("--batch-size", type=int, default=2, help="samples per forward pass")
    evaluate.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    evaluate.set_defaults(run=_cmd_evaluate)

    predict = commands.add_parser(
        "predict",
        formatter_class=_Formatter,
        help="write georeferenced land-cover maps (GeoTIFF) from a checkpoint",
        description="Predict FLAIR-2 patches (a FLAIR-2 folder: each patch with its own Sentinel-2 series, "
        "maps in OUT/DOMAIN/ZONE/PRED_xxx.tif, scored when labels exist) or large aerial GeoTIFFs "
        "(sliding windows with overlap and blending; +T models also need --s2 and --s2-dates). Each map is "
        "a uint8 GeoTIFF with the input's CRS and transform, DEFLATE, tiled, with a colour table and a "
        "QGIS style (.qml) naming the classes. Existing outputs are never replaced without --overwrite. "
        "Under torchrun the inputs are split across the ranks.",
        epilog="examples:\n"
        "  damformer predict --checkpoint runs/demo/damformer/checkpoint.pt \\\n"
        "      --src runs/demo/flair2 --out maps\n"
        "  damformer predict --checkpoint CKPT --src ortho.tif --out maps --window 512 --stride 384 --tta\n"
        "  torchrun --nproc_per_node=4 -m damformer predict --checkpoint CKPT --src t/*.tif --out maps",
    )
    predict.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of a run")
    predict.add_argument(
        "--src", type=Path, nargs="+", required=True, help="a FLAIR-2 folder, or aerial GeoTIFFs"
    )
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument("--split", default="test", choices=["train", "test"], help="FLAIR-2 split to map")
    predict.add_argument("--domains", nargs="+", help="FLAIR-2 domains (ids, prefixes, north/south)")
    predict.add_argument("--window", type=int, default=512, help="sliding window side (pixels), GeoTIFFs")
    predict.add_argument("--stride", type=int, help="step between windows (default: 3/4 of --window)")
    predict.add_argument("--batch-size", type=int, default=4, help="patches or windows per forward pass")
    predict.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    predict.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="AMP")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    predict.add_argument("--teacher", action="store_true", help="use the EMA teacher's weights")
    predict.add_argument("--probabilities", action="store_true", help="also NAME_proba.tif (16-bit floats)")
    predict.add_argument("--quicklook", action="store_true", help="also NAME.png (colourised map)")
    predict.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    predict.add_argument("--s2", type=Path, help="Sentinel-2 stack GeoTIFF (T x 10 bands) for +T models")
    predict.add_argument(
        "--s2-dates",
        type=Path,
        help="its dates: one YYYY-MM-DD per line (a monthly mean is dated the 15th, as in training)",
    )
    predict.add_argument(
        "--s2-reference",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="origin of the day offsets fed to U-TAE (default: May 15 of the first date's year, as training)",
    )
    predict.add_argument(
        "--allow-partial-s2",
        action="store_true",
        help="accept a stack that covers the raster only in part (windows outside it read zeros)",
    )
    predict.add_argument(
        "--bands",
        type=_parse_bands,
        metavar="I,J,...",
        help="1-based bands of the raster in the model's order (R,G,B,NIR,elevation; R,G,B for RGB models); "
        "needed when the raster has another band count than 5 or the model's",
    )
    predict.set_defaults(run=_cmd_predict)

    compare = commands.add_parser(
        "compare",
        formatter_class=_Formatter,
        help="table of runs side by side: model, inputs, mIoU, IoU per class",
        description="Compare finished runs: from their folders (config.yaml + scores.json, no tracking "
        "needed), or from the runs of one MLflow experiment. To browse them in the MLflow UI instead: "
        "damformer ui runs/demo (runs launched side by side share their parent folder's store).",
        epilog="examples:\n  damformer compare runs/demo/source_only runs/demo/uda runs/demo/damformer\n"
        "  damformer compare --tracking-uri http://127.0.0.1:5000 --experiment ablation",
    )
    compare.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders (run.output_dir)")
    compare.add_argument("--tracking-uri", metavar="URI", help="read an MLflow store or server instead")
    compare.add_argument("--experiment", default="damformer", help="MLflow experiment (with --tracking-uri)")
    compare.set_defaults(run=_cmd_compare)

    ui = commands.add_parser(
        "ui",
        formatter_class=_Formatter,
        help="browse and compare runs in the MLflow UI (bound to 127.0.0.1)",
        description="Start the MLflow UI over the local store that runs share: every run logs to the "
        "mlflow.db of its run folder's parent (runs/demo/uda -> runs/demo/mlflow.db), so `damformer ui "
        "runs/demo` shows the demo's three runs side by side (tick them, then Compare). A path may be a "
        "store file, a folder of runs, or a run folder; several must share one store. The URL printed "
        "opens their experiment. It listens on 127.0.0.1 only: MLflow has no authentication. From your "
        "laptop, tunnel to it: ssh -L 5000:127.0.0.1:5000 NODE, then open the URL.",
        epilog="examples:\n  damformer ui runs/demo\n  damformer ui runs/demo/damformer runs/demo/uda\n"
        "  damformer ui runs/studies/miniature/mlflow.db --port 5001",
    )
    ui.add_argument(
        "paths", nargs="*", type=Path, metavar="STORE_OR_FOLDER", help="default: runs/demo (the demo's store)"
    )
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others warn: no auth)"
    )
    ui.set_defaults(run=_cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``damformer`` command (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="damformer",
        formatter_class=_Formatter,
        description="DAM-Former: aerial + Sentinel-2 land-cover segmentation with unsupervised domain "
        "adaptation.",
        epilog="Run 'damformer COMMAND --help' for the options and an example of each command.",
    )
    parser.add_argument("--version", action="version", version=f"damformer {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress and no INFO lines")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO, WARNING with -q"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = commands.add_parser(
        "synth",
        formatter_class=_Formatter,
        help="write a miniature FLAIR-2 (demo and test data)",
        description="Write a small dataset in exactly the FLAIR-2 layout: 5-band aerial GeoTIFFs (EPSG:2154, "
        "0.2 m), labels, Sentinel-2 superpatches, centroid and metadata JSON; real south and north "
        "domain ids with a learnable, domain-shifted signal.",
        epilog="example:\n  damformer synth --out runs/demo/flair2\n"
        "  damformer synth --out /tmp/f2 --full-size "
        "--patches-per-zone 4",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    synth.add_argument("--seed", type=int, default=0, help="the dataset is a function of this seed")
    synth.add_argument("--patch-size", type=int, default=256, help="aerial side in pixels (multiple of 32)")
    synth.add_argument("--full-size", action="store_true", help="real FLAIR-2 size: 512 x 512 patches")
    synth.add_argument(
        "--domains-per-region", type=int, default=2, help="south and north domains each (1..5)"
    )
    synth.add_argument("--zones-per-domain", type=int, default=2, help="train-split zones per domain")
    synth.add_argument("--test-zones-per-domain", type=int, default=1, help="test-split zones per domain")
    synth.add_argument("--patches-per-zone", type=int, default=6, help="aerial patches per zone")
    synth.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    synth.set_defaults(run=_cmd_synth)

    read = commands.add_parser(
        "read",
        formatter_class=_Formatter,
        help="read and validate every patch of a FLAIR-2 selection",
        description="Read every patch of the selected domains (aerial, label, Sentinel-2 crop: cloud filter, "
        "monthly means) and print per-domain statistics. Any malformed file is reported by name.",
        epilog="example:\n  damformer read --root /data/FLAIR2 --domains south\n"
        "  damformer read --root runs/demo/flair2 --domains north --split test --no-monthly",
    )
    _add_dataset_arguments(read)
    read.set_defaults(run=_cmd_read)
    _add_shard_parsers(commands)
    _add_training_parsers(commands)
    _add_study_parser(commands)
    return parser


def _dump_stacks_on_fatal_signals() -> None:
    """A process that dies in native code (SIGSEGV, SIGABRT, ...) prints where each Python thread stood.

    Under torchrun a rank that aborts otherwise leaves one line ("exitcode: -6") and nothing to act on.
    """
    if faulthandler.is_enabled() or sys.__stderr__ is None:
        return
    with contextlib.suppress(OSError, ValueError):  # no file descriptor behind stderr (embedded use)
        faulthandler.enable(file=sys.__stderr__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``damformer`` console script; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its own parser: what follows "--" is another damformer command
        from damformer.runtime.launcher import main as launch_main

        return launch_main(argv[1:])
    for index in range(len(argv) - 1):  # 'shard verify DIR' reads better than a separate command name
        if argv[index : index + 2] == ["shard", "verify"]:
            argv[index : index + 2] = ["shard-verify"]
            break
    args = parser.parse_args(argv)
    configure_logging(args.log_level, quiet=args.quiet)
    set_quiet(args.quiet)
    _dump_stacks_on_fatal_signals()
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (DamformerError, _OptionError) as exc:
        rank = process_rank()  # under torchrun every rank reports: say which one
        where = f"damformer {args.command}" + (f" (rank {rank})" if rank else "")
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"damformer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
