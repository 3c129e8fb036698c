"""``damformer predict``: georeferenced land-cover maps of FLAIR-2 patches or of aerial GeoTIFFs of any size.

Every option, the checkpoint and the inputs are checked before any compute; under torchrun the inputs
are split across the ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from damformer.atomic import check_writable_folder
from damformer.data.classes import FLAIR_CLASSES
from damformer.errors import OptionError
from damformer.predict.geotiff import check_writable, write_vrt
from damformer.predict.mosaic import MosaicOptions, SentinelStack, check_mosaic, predict_mosaics
from damformer.predict.run import Outputs, predict_flair2
from damformer.predict.sliding import PatchPredictor
from damformer.runtime.cpu_memory import retain_freed_memory
from damformer.runtime.device import amp_context, resolve_device
from damformer.runtime.distributed import barrier, distributed_session, sum_over_ranks
from damformer.runtime.model_files import open_model

VRT_NAME = "maps.vrt"


def check_predict_options(args: argparse.Namespace) -> int:
    """Option values before anything is loaded; returns the stride."""
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: expected >= 1")
    if args.window < 32 or args.window % 32:
        raise OptionError(
            f"--window {args.window}: expected a multiple of 32 (the encoder's deepest stride), e.g. "
            f"{max(32, args.window // 32 * 32)} or {max(32, -(-args.window // 32) * 32)}"
        )
    stride = args.stride if args.stride is not None else max(1, args.window * 3 // 4)
    if not 1 <= stride <= args.window:
        raise OptionError(f"--stride {stride}: expected 1..--window ({args.window})")
    if args.s2 and not args.s2_dates:
        raise OptionError("--s2 needs --s2-dates (a text file, one YYYY-MM-DD per line, one per date)")
    missing = [str(path) for path in args.src if not path.exists()]
    if missing:
        raise OptionError(f"--src: not found: {', '.join(missing)}")
    named: dict[str, Path] = {}
    for path in args.src:  # maps are named after their input: two inputs of one name would overwrite
        if path.is_file() and (first := named.setdefault(path.stem, path)) != path:
            raise OptionError(
                f"--src {first} and {path} would both be written to {args.out / (path.stem + '.tif')}: "
                "rename one of them, or predict them into separate --out folders"
            )
    check_writable_folder(args.out, "--out")
    return stride


def predict_command(args: argparse.Namespace) -> int:
    """Write the maps (and optional probabilities and quicklooks); FLAIR-2 patches are also scored."""
    stride = check_predict_options(args)
    check_writable([args.out / VRT_NAME], overwrite=args.overwrite)
    loaded = open_model(args.checkpoint, teacher=args.teacher)  # a checkpoint, a run folder or an export
    model, model_config = loaded.model, loaded.config
    flair2 = len(args.src) == 1 and args.src[0].is_dir()
    stack = SentinelStack.open(args.s2, args.s2_dates, reference=args.s2_reference) if args.s2 else None
    if stack is not None:
        stack.check_scale(loaded.s2_mean)
    options = MosaicOptions(
        args.window, stride, args.batch_size, stack, bands=args.bands, allow_partial_s2=args.allow_partial_s2
    )
    mosaics = [] if flair2 else [check_mosaic(path, model_config, options) for path in args.src]
    device = resolve_device(args.device)
    retain_freed_memory(device)
    with distributed_session(device) as dist:
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
                print(f"{model_config.name} (iteration {loaded.iteration}): maps in {args.out}")
                if result is not None:
                    print(result.table([c.name for c in FLAIR_CLASSES][: model_config.num_classes]))
        else:
            written = predict_mosaics(
                mosaics, model_config, outputs, options, predictor=predictor, rank=dist.rank,
                world_size=dist.world_size,
            )  # fmt: skip
            for source, path in zip(args.src[dist.rank :: dist.world_size], written, strict=True):
                print(f"{source} -> {path}")
        barrier(dist)  # every rank's maps are written
        if dist.is_main:  # one layer for GIS users: every class map of the folder
            maps = sorted(p for p in args.out.rglob("*.tif") if not p.name.endswith("_proba.tif"))
            if write_vrt(maps, args.out / VRT_NAME) is not None:
                print(f"mosaic of the {len(maps)} maps: {args.out / VRT_NAME}")
    return 0
