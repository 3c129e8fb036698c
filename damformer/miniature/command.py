"""``damformer synth``: write a miniature FLAIR-2 in the real on-disk layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from damformer.atomic import check_writable_folder
from damformer.errors import OptionError
from damformer.miniature.synth import SynthOptions, generate


def synth_command(args: argparse.Namespace) -> int:
    """Generate the dataset (atomically) and say what was written."""
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
        raise OptionError(str(exc)) from None
    check_writable_folder(Path(args.out).parent if Path(args.out).exists() else Path(args.out), "--out")
    info = generate(args.out, options, overwrite=args.overwrite)
    counts = ", ".join(f"{key}: {value}" for key, value in sorted(info["patches"].items()))
    print(f"miniature FLAIR-2 written to {args.out} ({counts} patches of {options.patch_size} px)")
    print(
        f"south domains: {' '.join(info['regions']['south'])}; "
        f"north domains: {' '.join(info['regions']['north'])}"
    )
    return 0
