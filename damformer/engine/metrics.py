"""Training metrics on the device, read on the host once per log interval.

Reading a tensor's value waits for the device: a step that did it for every loss would stall a GPU at
every step. Each step's metrics are queued as detached device tensors; :meth:`MetricsQueue.flush`
averages them over the ranks in one collective, reads them in one transfer and turns them into the
per-step history entries (``{"loss_source": ..., "lr": ..., "iteration": ...}``).
"""

from __future__ import annotations

import logging

import torch

from damformer.runtime.distributed import DistContext, mean_over_ranks

log = logging.getLogger(__name__)


class MetricsQueue:
    """Queued step metrics and the count of skipped fp16 steps (``overflow`` is a 0/1 metric)."""

    def __init__(self, dist: DistContext) -> None:
        self.dist = dist
        self.pending: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.overflow_steps = 0

    def add(self, iteration: int, lr: float, metrics: dict[str, torch.Tensor]) -> None:
        """Queue the metrics of one step (no host synchronisation)."""
        self.pending.append((iteration, lr, metrics))

    def flush(self) -> list[dict[str, float]]:
        """The history entries of the queued steps (collective under DDP: every rank calls it)."""
        if not self.pending:
            return []
        keys = [sorted(values) for _, _, values in self.pending]
        flat = torch.cat(
            [
                torch.stack([values[k].reshape(()).double() for k in names])
                for (_, _, values), names in zip(self.pending, keys, strict=True)
            ]
        )
        numbers = mean_over_ranks(self.dist, flat).tolist()  # the one wait for the device
        entries, position = [], 0
        for (iteration, lr, _), names in zip(self.pending, keys, strict=True):
            entry = dict(zip(names, numbers[position : position + len(names)], strict=True))
            position += len(names)
            if "overflow" in entry:  # fp16: the step was skipped (every rank saw the same gradients)
                if entry.pop("overflow") > 0.5:
                    self.overflow_steps += 1
                    log.warning("iteration %d: fp16 gradient overflow, step skipped", iteration)
                entry["overflow_steps"] = float(self.overflow_steps)
            entry["lr"], entry["iteration"] = lr, iteration
            entries.append(entry)
        self.pending.clear()
        return entries


# Counters whose meaning is "so far": an interval reports their last value, not their mean.
LAST_VALUE = ("overflow_steps",)


def interval_means(entries: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over ``entries`` (an interval of steps), as mmcv's logger reports them.

    A single step's loss jumps by a factor of two from batch to batch; the interval's mean is the curve.
    """
    means: dict[str, float] = {}
    for key in sorted({k for entry in entries for k in entry if k != "iteration"}):
        values = [entry[key] for entry in entries if key in entry]
        means[key] = values[-1] if key in LAST_VALUE else sum(values) / len(values)
    return means


class IntervalCursor:
    """Where in the history the current interval starts (one for the console, one for the tracker)."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def take(self, history: list[dict[str, float]]) -> list[dict[str, float]]:
        """The entries since the last call, and start a new interval."""
        entries, self.start = history[self.start :], len(history)
        return entries


def metric_interval(*, configured: int | None, max_iters: int) -> int:
    """Iterations per tracked point: ``log.metric_interval``, else about 100 points a run."""
    return configured or max(1, max_iters // 100)
