"""Parsers of the data commands: synth, read, shard and shard verify (dispatched by damformer.cli)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Command = Callable[[str, str], Callable[[argparse.Namespace], int]]


def add_data_parsers(
    commands: argparse._SubParsersAction, *, formatter: type[argparse.HelpFormatter], command: Command
) -> None:
    """Add ``synth``, ``read``, ``shard`` and ``shard-verify``; ``command(module, function)`` runs each."""
    synth = commands.add_parser(
        "synth",
        formatter_class=formatter,
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
    synth.set_defaults(run=command("damformer.miniature.command", "synth_command"))

    read = commands.add_parser(
        "read",
        formatter_class=formatter,
        help="read and validate every patch of a FLAIR-2 selection",
        description="Read every patch of the selected domains (aerial, label, Sentinel-2 crop: cloud filter, "
        "monthly means) and print per-domain statistics. Any malformed file is reported by name.",
        epilog="example:\n  damformer read --root /data/FLAIR2 --domains south\n"
        "  damformer read --root runs/demo/flair2 --domains north --split test --no-monthly",
    )
    _add_dataset_arguments(read)
    read.set_defaults(run=command("damformer.data.command", "read_command"))
    _add_shard_parsers(commands, formatter=formatter, command=command)


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


def _add_shard_parsers(
    commands: argparse._SubParsersAction, *, formatter: type[argparse.HelpFormatter], command: Command
) -> None:
    shard = commands.add_parser(
        "shard",
        formatter_class=formatter,
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
    shard.set_defaults(run=command("damformer.shards.command", "shard_command"))

    verify = commands.add_parser(
        "shard-verify",
        formatter_class=formatter,
        help="same as 'shard verify DIR': re-check shard sets (counts, sha256, every sample decodes)",
        description="Re-check shard sets: every shard listed in the manifest is present with the recorded "
        "size and sha256, and every sample decodes and is listed in order.",
        epilog="example:\n  damformer shard verify shards/south shards/north",
    )
    verify.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="shard-set folders")
    verify.set_defaults(run=command("damformer.shards.command", "verify_command"))
