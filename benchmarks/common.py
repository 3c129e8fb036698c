"""What every benchmark script shares: device options, interleaved timing, peak memory, tables, results.

Timing: the candidates of one comparison run in alternating rounds in one process, and the median of
each is reported, so machine noise hits both sides alike (never compare figures of two runs).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the step.
On CPU there is no allocator counter, so each case runs once in a fresh child process (the script
itself, with ``--memory-case``) that reports how far one step raised its peak resident set size
(VmHWM) above the level after building the model and inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from damformer.runtime.cpu_memory import retain_freed_memory

Step = Callable[[], Any]
StepFactory = Callable[[], Step]

# Dense peak TFLOP/s (no sparsity) of the GPUs our users run, per AMP dtype: model FLOP utilisation is
# measured against these. Vendor datasheets; V100 has no bf16 tensor cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "A100": {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5},
    "H100 PCIe": {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0},
    "H100": {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},  # SXM
    "H200": {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --threads, --rounds, --json and the hidden --memory-case used by the child processes."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: all cores, as in training)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)


def setup(args: argparse.Namespace) -> torch.device:
    """The device to run on, with threads set; a clear exit when CUDA is asked for and absent."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory(device)  # as training and prediction do on CPU (damformer/runtime/cpu_memory.py)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    steps: dict[str, Step], device: torch.device, *, rounds: int, repeats: int = 1, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each step, measured in alternating rounds (rotating the order) after
    ``warmup`` calls each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds):
        # each round starts with the next candidate: none always follows the same one (whose leftovers
        # in caches and in the heap would favour or burden it)
        for name in names[index % len(names) :] + names[: index % len(names)]:
            step = steps[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over
    from the parent through fork and exec, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def measure_peak(factory: StepFactory, device: torch.device) -> int:
    """Bytes one step needs above the built model and inputs (run in a fresh process on CPU)."""
    step = factory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = peak_rss_bytes()
    step()
    return peak_rss_bytes() - before


def child_peak_bytes(script: str, case: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """Run ``script --memory-case case`` in a fresh interpreter and return the peak bytes it prints."""
    command = [sys.executable, script, "--memory-case", case, "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(
        [*command, *extra], capture_output=True, text=True, check=False, env=dict(os.environ)
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def run_memory_case(cases: dict[str, StepFactory], case: str, device: torch.device) -> None:
    """The child side of :func:`child_peak_bytes`: print the peak bytes of one case."""
    if case not in cases:
        sys.exit(f"unknown memory case {case!r}; known: {', '.join(cases)}")
    print(measure_peak(cases[case], device))


def count_flops(step: Step) -> int:
    """FLOPs of one call (forward and backward), counted by torch's dispatcher-level FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def gpu_busy_fraction(step: Step, *, iterations: int = 5) -> float:
    """Share of the wall time during which the GPU runs a kernel, over ``iterations`` calls.

    torch.profiler's CUDA kernel intervals are merged (streams may overlap) and divided by the wall
    time between two synchronisations: 1.0 means the host never kept the GPU waiting.
    """
    from torch.profiler import ProfilerActivity, profile

    step()  # warm: allocations, autotuning, compilation
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, current_start, current_end = 0.0, None, None
    for begin, end in intervals:  # microseconds
        if current_end is None or begin > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return min(1.0, busy / 1e6 / wall)


def gpu_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak of this GPU for ``precision`` (None where the GPU or dtype is not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key].get(precision)
    return None


def mib(nbytes: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{nbytes / 2**20:.1f}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])

    print(f"\n== {title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def machine_description(device: torch.device) -> str:
    """One line naming the machine: GPU name or CPU core count, and torch's version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + rename), when a path is given."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def verdict(ratio: float, target: float, *, at_most: bool = True) -> str:
    """'met' or 'MISSED by N%' for a ratio against its target."""
    ok = ratio <= target if at_most else ratio >= target
    if ok:
        return "met"
    off = (ratio / target - 1) if at_most else (1 - ratio / target)
    return f"MISSED by {abs(off) * 100:.0f}%"
