"""The ``damformer`` command. Subcommands parse arguments and call into the package; no logic lives here.

Errors of our own (:class:`damformer.errors.DamformerError`) and invalid option values are printed as
one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from damformer import __version__
from damformer.cli_data import add_data_parsers
from damformer.errors import EXIT_INTERRUPTED, EXIT_USAGE, DamformerError
from damformer.logs import configure_logging, process_rank
from damformer.progress import set_quiet

log = logging.getLogger("damformer")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show informative defaults once, and keep the hand-made line breaks of examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        uninformative = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in help_text.lower() or uninformative or action.option_strings == []:
            return help_text  # the help already says it, or there is nothing to say (flags, None)
        return f"{help_text} (default: %(default)s)"


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The command's body, imported when it runs: ``damformer X --help`` imports nothing heavy."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _parse_bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 1-based band numbers separated by commas, found {text!r}"
        ) from None


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
    study.add_argument(
        "--retrain-changed",
        action="store_true",
        help="train again the runs whose config changed since they were trained (their folders are moved "
        "aside); without it such a study stops and names them",
    )
    mode = study.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")
    mode.add_argument("--collect", action="store_true", help="only write the tables and figure")
    mode.add_argument(
        "--slurm-tasks", action="store_true", help="write a task file for a Slurm job array (slurm/study.sh)"
    )
    study.set_defaults(run=_command("damformer.study.command", "study_command"))


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
        "--print-config",
        action="store_true",
        help="print the resolved config (file, overlays, --set) as YAML, headed by how its global batch "
        "splits over --world-size processes; train nothing",
    )
    train.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="processes to plan the batch for, with --dry-run or --print-config (default: $WORLD_SIZE or 1)",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="ITER",
        help="stop with a checkpoint once iteration ITER is done (the schedule still ends at "
        "optim.max_iters): split a run over time-limited jobs, continue with --resume",
    )
    train.set_defaults(run=_command("damformer.engine.command", "train_command"))

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
    evaluate.add_argument(
        "--json", action="store_true", help="print the scores as JSON on stdout (for scripts), not the table"
    )
    evaluate.set_defaults(run=_command("damformer.eval.command", "evaluate_command"))

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
    predict.set_defaults(run=_command("damformer.predict.command", "predict_command"))

    export = commands.add_parser(
        "export",
        formatter_class=_Formatter,
        help="export a trained model for sharing: weights (safetensors), config, model card",
        description="Write the student (or --teacher) of a checkpoint as model.safetensors, its config, "
        "class table and input normalisation as model.json, and a model card (README.md: data, domains, "
        "recipe, iterations, scores with their split, commit); with --torchscript also a traced "
        "model.torchscript.pt. predict and evaluate take the folder as --checkpoint; in Python: "
        "damformer.load_model(FOLDER).",
        epilog="examples:\n"
        "  damformer export --checkpoint runs/demo/damformer/checkpoint.pt --out exported/damformer\n"
        "  damformer export --checkpoint CKPT --out DIR --torchscript --trace-size 512",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt, or its run folder")
    export.add_argument("--out", type=Path, required=True, help="the export folder")
    export.add_argument("--teacher", action="store_true", help="export the EMA teacher instead")
    export.add_argument("--torchscript", action="store_true", help="also model.torchscript.pt (traced)")
    export.add_argument(
        "--trace-size", type=int, default=512, help="aerial side the TorchScript is traced at"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(run=_command("damformer.runtime.export", "export_command"))

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
    compare.set_defaults(run=_command("damformer.tracking.command", "compare_command"))

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
    ui.set_defaults(run=_command("damformer.tracking.command", "ui_command"))


def _add_common_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    """-q and --log-level; on a command with SUPPRESS defaults, so they do not reset the global ones."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress and no INFO lines"
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=None if default is False else default,
        help="default: INFO, WARNING with -q",
    )


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
    _add_common_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_data_parsers(commands, formatter=_Formatter, command=_command)
    _add_training_parsers(commands)
    _add_study_parser(commands)
    for subparser in commands.choices.values():  # also after the command: damformer compare -q
        _add_common_options(subparser, default=argparse.SUPPRESS)
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
    except DamformerError as exc:
        rank = process_rank()  # under torchrun every rank reports: say which one
        where = f"damformer {args.command}" + (f" (rank {rank})" if rank else "")
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"damformer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
