"""``damformer shard`` and ``damformer shard verify``."""

from __future__ import annotations

import argparse

from damformer.data.command import dataset_from_options
from damformer.errors import OptionError
from damformer.shards.writer import ShardWriteOptions, parse_size, verify_shards, write_shards


def shard_command(args: argparse.Namespace) -> int:
    """Write (or resume writing) one shard set and say what it holds."""
    try:
        options = ShardWriteOptions(
            max_samples=args.max_samples, shard_bytes=parse_size(args.shard_size), workers=args.workers
        )
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    dataset = dataset_from_options(args)
    manifest = write_shards(dataset, args.out, options, overwrite=args.overwrite)
    size = sum(shard["bytes"] for shard in manifest["shards"])
    print(
        f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({size / 1e6:.1f} MB) over domains {' '.join(manifest['domains'])}; "
        f"{manifest['written']} written, {len(manifest['shards']) - manifest['written']} already complete"
    )
    return 0


def verify_command(args: argparse.Namespace) -> int:
    """Re-check shard sets: sizes, checksums, every sample decodes."""
    for folder in args.dirs:
        result = verify_shards(folder)
        print(f"{folder}: OK, {result['samples']} samples in {result['shards']} shards, checksums match")
    return 0
