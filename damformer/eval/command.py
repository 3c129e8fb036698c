"""``damformer evaluate``: score a checkpoint on labelled shard sets (IoU per class, mIoU, accuracy)."""

from __future__ import annotations

import argparse
import json
import math

from damformer.data.classes import FLAIR_CLASSES
from damformer.errors import OptionError
from damformer.eval.evaluate import evaluate
from damformer.runtime.cpu_memory import retain_freed_memory
from damformer.runtime.device import resolve_device
from damformer.runtime.model_files import open_model
from damformer.runtime.shard_fit import check_shard_sets
from damformer.shards.shardset import ShardSet


def evaluate_command(args: argparse.Namespace) -> int:
    """Check the checkpoint, then the shards (labelled), then score and print the table."""
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: expected >= 1")
    # the checkpoint first: a refused one (not weights, or no damformer checkpoint) is the likelier mistake
    loaded = open_model(args.checkpoint, teacher=args.teacher)  # a checkpoint, a run folder or an export
    model, model_config = loaded.model, loaded.config
    shard_set = ShardSet(args.shards, domains=args.domains)
    unlabelled = [
        str(f)
        for f, m in zip(args.shards, shard_set.manifests, strict=True)
        if not m["params"]["with_labels"]
    ]
    if unlabelled:
        raise OptionError(
            f"--shards {', '.join(unlabelled)}: sharded without labels (--no-labels): evaluation needs a "
            "labelled set, e.g. the target's test split"
        )
    # the checks training makes (classes, bands, patch size, Sentinel-2 footprint and crop): a model scored
    # on shards it could not have trained on gives numbers, not an answer
    check_shard_sets(model_config, [("--shards", shard_set, args.shards, True)])
    device = resolve_device(args.device)
    retain_freed_memory(device)
    model.to(device)
    result = evaluate(
        model, shard_set, num_classes=model_config.num_classes, batch_size=args.batch_size, device=device
    )
    names = [c.name for c in FLAIR_CLASSES][: model_config.num_classes]
    if args.json:  # one JSON document, nothing else on stdout: for scripts
        record = {
            "checkpoint": str(args.checkpoint),
            "model": model_config.name,
            "shards": list(map(str, args.shards)),
        }
        scores = _finite_or_null(result.to_json(iteration=loaded.iteration))
        scores["iou_by_class"] = dict(zip(names, scores["iou"], strict=False))
        print(json.dumps(record | scores, allow_nan=False))
        return 0
    print(f"{model_config.name} at iteration {loaded.iteration} on {', '.join(map(str, args.shards))}")
    print(result.table(names))
    return 0


def _finite_or_null(value: object) -> object:
    """NaN (a class neither predicted nor present) as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value
