"""``damformer read``: read and validate every patch of a FLAIR-2 selection, and print its statistics."""

from __future__ import annotations

import argparse

from damformer.data.flair2 import Flair2Dataset
from damformer.data.sentinel import SentinelOptions
from damformer.data.summary import format_summary, summarize
from damformer.errors import OptionError


def dataset_from_options(args: argparse.Namespace) -> Flair2Dataset:
    """The FLAIR-2 selection that the dataset options of ``read`` and ``shard`` describe."""
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
        raise OptionError(str(exc)) from None
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


def read_command(args: argparse.Namespace) -> int:
    """Read every patch (any malformed file is an error naming it) and print per-domain statistics."""
    dataset = dataset_from_options(args)
    print(f"{args.root} [{args.split}]: {len(dataset)} patches in {len(dataset.domains)} domains")
    print(format_summary(summarize(dataset)))
    return 0
