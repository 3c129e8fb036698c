"""Evaluate a segmentation model on labelled shards: confusion matrix, per-class IoU, mIoU, accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from damformer.eval.metrics import ConfusionMatrix, SegmentationScores, scores
from damformer.loading.loader import LoaderOptions, ShardLoader
from damformer.models.damformer import predict_logits
from damformer.progress import progress
from damformer.shards.shardset import ShardSet


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then give every submodule back its own train/eval flag.

    ``model.train(was_training)`` would not do: the EMA teacher is in eval mode except its BatchNorm
    layers, which normalise with the statistics of the batch they label, and a blanket ``train(False)``
    after an evaluation would leave them in eval mode for the rest of the training.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch to ``device`` (labels stay uint8 until the loss casts them)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    shard_set: ShardSet,
    *,
    num_classes: int,
    batch_size: int = 2,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> SegmentationScores:
    """Score the HR prediction (argmax) of ``model`` on every labelled sample of ``shard_set``.

    Under data parallelism each rank scores its own share of the samples (every sample exactly once)
    and ``reduce`` sums the confusion matrices over the ranks.
    """
    device = device or next(model.parameters()).device
    matrix = ConfusionMatrix(num_classes)
    loader = ShardLoader(
        shard_set,
        LoaderOptions(
            batch_size=batch_size,
            augment=False,
            pad=False,
            shuffle_buffer=1,
            pin_memory=device.type == "cuda",
        ),
        rank=rank,
        world_size=world_size,
    )
    batches = loader if rank else progress(loader, desc="evaluate", unit="batch", total=len(loader))
    with eval_mode(model):
        for batch in batches:
            if "label" not in batch:
                raise ValueError("evaluation needs labelled shards (these were sharded with --no-labels)")
            batch = to_device(batch, device)
            with autocast():
                logits = predict_logits(model, batch)
            matrix.update(logits.argmax(dim=1), batch["label"])
    total = matrix.matrix if reduce is None else reduce(matrix.matrix)
    return scores(total)
