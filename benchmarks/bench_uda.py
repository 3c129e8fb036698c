"""One UDA iteration against one supervised iteration of the same model, side by side.

Both run the trainer's own step pieces (``SelfTraining.forward_backward``, AdamW, the teacher's EMA):

* supervised: source forward + backward, optimiser step;
* UDA: source forward + backward, teacher forward on the target, ClassMix + strong augmentation,
  mixed forward + backward, optimiser step, teacher EMA update.

Theory, counting a backward as two forwards: (3 + 1 + 3) / 3 = 2.33x. Target: <= 2.5x. Also the peak
memory of each step (fresh child processes on CPU, the CUDA allocator's peak on a GPU), the FLOPs of
one UDA iteration (torch's FLOP counter) and, on a GPU, the model FLOP utilisation against the
datasheet peak.

    python benchmarks/bench_uda.py                      # CPU, DAM-Former with MiT-b0: about 3 minutes
    python benchmarks/bench_uda.py --device cuda --backbone mit_b4 --batch 2 \\
        --precision bf16 --channels-last --compile      # the GPU variants (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Step,
    StepFactory,
    add_common_arguments,
    child_peak_bytes,
    count_flops,
    gpu_busy_fraction,
    gpu_peak_tflops,
    interleaved_seconds,
    machine_description,
    mib,
    print_table,
    run_memory_case,
    setup,
    verdict,
    write_json,
)

from damformer.config import UDAConfig
from damformer.engine.optim import build_optimizer
from damformer.models.factory import ModelConfig, build_model
from damformer.uda.dacs import SelfTraining

THEORY = 7 / 3
TARGET = 2.5
NUM_CLASSES = 13


def synthetic_batch(batch: int, size: int, dates: int, device: torch.device, *, seed: int) -> dict[str, Any]:
    """A loader-shaped batch: uint8 aerial, blocky labels (several classes, as ClassMix needs), S2."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, NUM_CLASSES, (batch, 1, 8, 8), generator=generator).float()
    labels = F.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].to(torch.uint8)
    return {
        "aerial": torch.randint(0, 256, (batch, 5, size, size), generator=generator, dtype=torch.uint8).to(
            device
        ),
        "label": labels.to(device),
        "s2": (torch.rand(batch, dates, 10, 40, 40, generator=generator) * 3000).to(device),
        "s2_mask": torch.ones(batch, dates, dtype=torch.bool, device=device),
        "s2_day_offsets": torch.linspace(0, 330, dates).expand(batch, dates).contiguous().to(device),
    }


def step_factory(uda: bool, args: argparse.Namespace, device: torch.device) -> StepFactory:
    """One optimiser iteration, supervised (``uda=False``) or self-training, of DAM-Former."""

    def factory() -> Step:
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(arch="damformer", bands="rgbne", temporal=True, backbone=args.backbone)
        )
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        trainer = SelfTraining(model, UDAConfig(enabled=uda), seed=0).to_device(device)
        if args.compile:
            trainer.compile()  # the student's and the teacher's forward, as run.compile does
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        if dtype is not None:
            trainer.autocast = lambda: torch.autocast(device.type, dtype=dtype)
        scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        optimizer = build_optimizer(model, fused=device.type == "cuda")
        source = synthetic_batch(args.batch, args.size, args.dates, device, seed=1)
        target = synthetic_batch(args.batch, args.size, args.dates, device, seed=2) if uda else None
        if target is not None:
            del target["label"]
        backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else None
        iteration = [0]

        def step() -> None:
            model.train()
            trainer.forward_backward(source, target, backward=backward)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trainer.update_teacher(iteration[0])
            iteration[0] += 1

        return step

    return factory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--backbone", default=None, help="MiT size (default: mit_b0 on CPU, mit_b4 on CUDA)")
    parser.add_argument(
        "--batch", type=int, default=2, help="source images per iteration (and as many target)"
    )
    parser.add_argument("--size", type=int, default=512, help="aerial patch side in pixels (default 512)")
    parser.add_argument(
        "--dates", type=int, default=12, help="Sentinel-2 dates per sample (12 monthly means)"
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights (convs follow)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student's forward")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="minutes, not tens: peak memory measured in this process (not fresh children), 2 rounds",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    device = setup(args)
    args.backbone = args.backbone or ("mit_b4" if device.type == "cuda" else "mit_b0")
    cases = {"supervised": step_factory(False, args, device), "uda": step_factory(True, args, device)}
    if args.memory_case:
        run_memory_case(cases, args.memory_case, device)
        return

    variant = ", ".join(
        [
            args.precision,
            *(["channels_last"] if args.channels_last else []),
            *(["compiled"] if args.compile else []),
        ]
    )
    print(
        f"machine: {machine_description(device)}; DAM-Former {args.backbone}, "
        f"batch {args.batch} + {args.batch}, {args.size} px, T={args.dates}; {variant}"
    )
    if args.compile:  # FLOPs of the same iteration, counted on an eager copy (the counter needs eager)
        eager = argparse.Namespace(**{**vars(args), "compile": False})
        flops = count_flops(step_factory(True, eager, device)())
    steps = {name: factory() for name, factory in cases.items()}
    if not args.compile:
        flops = count_flops(steps["uda"])
    seconds = interleaved_seconds(steps, device, rounds=args.rounds, warmup=2 if args.compile else 1)
    busy = gpu_busy_fraction(steps["uda"]) if device.type == "cuda" else None
    if args.quick and device.type == "cuda":  # peak of the last iterations in this process
        peaks = {}
        for name, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated(device)
        del steps
    else:
        del steps
        extra = _child_args(args)
        peaks = {name: child_peak_bytes(__file__, name, args, extra) for name in cases}
    ratio = seconds["uda"] / seconds["supervised"]
    rows = []
    for name in cases:
        images = args.batch * (2 if name == "uda" else 1)  # UDA reads a source and a target batch
        rows.append(
            [name, f"{seconds[name] * 1e3:.0f}", f"{images / seconds[name]:.2f}", mib(peaks[name]),
             f"{seconds[name] / seconds['supervised']:.2f}x", f"{peaks[name] / peaks['supervised']:.2f}x"]
        )  # fmt: skip
    print_table(
        "one iteration (forward, backward, AdamW, EMA)",
        ["iteration", "ms", "images/s", "peak MiB", "time", "memory"],
        rows,
    )
    print(
        f"UDA / supervised time: {ratio:.2f}x (theory {THEORY:.2f}x); "
        f"target <= {TARGET}x: {verdict(ratio, TARGET)}"
    )
    result: dict[str, Any] = {
        "machine": machine_description(device),
        "variant": variant,
        "backbone": args.backbone,
        "seconds": seconds,
        "peak_bytes": peaks,
        "uda_over_supervised": ratio,
    }
    if busy is not None:
        print(f"GPU busy: {busy:.0%} of the UDA iteration's wall time (torch.profiler, kernels / wall)")
        result["gpu_busy"] = busy
    result["ms_per_iteration"] = {name: 1e3 * value for name, value in seconds.items()}
    if flops is not None:
        achieved = flops / seconds["uda"] / 1e12
        line = f"UDA iteration: {flops / 1e9:.0f} GFLOP, {achieved:.3f} TFLOP/s achieved"
        peak = gpu_peak_tflops(device, args.precision)
        if peak:
            line += f", model FLOP utilisation {achieved / peak:.1%} of the {peak:.0f} TFLOP/s datasheet peak"
            result["mfu"] = achieved / peak
        print(line)
        result.update(gflop=flops / 1e9, tflops=achieved)
    write_json(args.json, result)


def _child_args(args: argparse.Namespace) -> list[str]:
    extra = ["--backbone", args.backbone, "--batch", str(args.batch), "--size", str(args.size)]
    extra += ["--dates", str(args.dates), "--precision", args.precision]
    if args.channels_last:
        extra.append("--channels-last")
    if args.compile:
        extra.append("--compile")
    return extra


if __name__ == "__main__":
    main()
