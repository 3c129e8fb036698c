"""Data-parallel scaling and ZeRO memory, measured with real process groups (gloo on CPU, NCCL on GPUs).

1. Throughput: the same UDA iteration of DAM-Former (per-rank batch fixed: weak scaling) on 1 process
   and on 2 processes under torchrun with DDP, launched alternately. Efficiency = samples/s on 2 /
   (2 x samples/s on 1). Each process gets one CPU thread (torchrun's default), so on CPU this is
   per-core scaling.
2. Memory per rank: DDP against DeepSpeed ZeRO-1 and ZeRO-2 on 2 ranks, after two iterations: the
   optimiser state each rank holds (AdamW moments, plus ZeRO's fp32 master partition), counted from
   the tensors themselves, and each rank's peak resident memory (CPU) or peak allocated memory (CUDA).
   Theory in fp32 with N ranks: DDP 8 bytes per parameter; ZeRO-1/2 (4 master + 8 moments) / N.

    python benchmarks/bench_distributed.py              # CPU: about 3 minutes on 2 cores
    python benchmarks/bench_distributed.py --device cuda --nproc 2 --size 512 --backbone mit_b4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_uda import synthetic_batch
from common import machine_description, mib, peak_rss_bytes, print_table, synchronize, verdict, write_json

from damformer.config import DataConfig, DistConfig, RunConfig
from damformer.engine.optim import build_optimizer
from damformer.engine.strategies import deepspeed as deepspeed_engine
from damformer.models.factory import ModelConfig, build_model
from damformer.runtime.cpu_memory import retain_freed_memory
from damformer.runtime.distributed import DistContext, gather_objects, init_distributed, teardown
from damformer.uda.dacs import SelfTraining

MODES = ("single", "ddp", "zero1", "zero2")


def worker(args: argparse.Namespace) -> None:
    """One rank: build, run warm-up + timed iterations, report (rank 0 writes the JSON)."""
    device = torch.device(args.device)
    retain_freed_memory(device)  # as the trainer does on CPU
    context = init_distributed(device) if args.mode != "single" else DistContext()
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    engine_name = "deepspeed" if args.mode.startswith("zero") else "ddp"
    config = RunConfig(
        data=DataConfig(batch_size=args.batch),
        model=ModelConfig(arch="damformer", bands="rgbne", temporal=True, backbone=args.backbone),
        dist=DistConfig(
            engine=engine_name, zero_stage=int(args.mode[-1]) if engine_name == "deepspeed" else None
        ),
    )
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    trainer = SelfTraining(model, config.uda, seed=context.rank).to(device)
    optimizer = build_optimizer(model)
    engine = ddp = None
    backward = None
    if args.mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        trainer.use_student_forward(ddp)
    elif args.mode.startswith("zero"):
        ds_config = deepspeed_engine.deepspeed_config(config, context.world_size, device)
        engine = deepspeed_engine.initialize(model, optimizer, ds_config, device)
        trainer.use_student_forward(engine)
        backward = lambda loss: engine.backward(loss, scale_wrt_gas=False)  # noqa: E731
    source = synthetic_batch(args.batch, args.size, 12, device, seed=1 + context.rank)
    target = synthetic_batch(args.batch, args.size, 12, device, seed=101 + context.rank)
    del target["label"]

    def step(iteration: int) -> None:
        trainer.forward_backward(source, target, backward=backward)
        if engine is not None:
            engine.step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trainer.update_teacher(iteration)

    for iteration in range(args.warmup):
        step(iteration)
    synchronize(device)
    if context.enabled:
        torch.distributed.barrier()
    start = time.perf_counter()
    for iteration in range(args.warmup, args.warmup + args.steps):
        step(iteration)
    synchronize(device)
    if context.enabled:
        torch.distributed.barrier()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    report = {
        "rank": context.rank,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer, engine),
        "peak_bytes": peak,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    reports = gather_objects(context, report)
    if context.is_main:
        samples = args.batch * args.steps * context.world_size
        result = {"mode": args.mode, "world_size": context.world_size, "samples_per_s": samples / seconds}
        result["ranks"] = reports
        Path(args.result).write_text(json.dumps(result))
    teardown(context)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, engine: Any) -> int:
    """Bytes of optimiser state this rank holds: AdamW moments, and ZeRO's fp32 master partition."""
    inner = optimizer if engine is None else engine.optimizer.optimizer  # ZeRO wraps the torch AdamW
    total = 0
    for state in inner.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    if engine is not None:
        for partition in getattr(engine.optimizer, "single_partition_of_fp32_groups", []):
            total += partition.numel() * partition.element_size()
    return total


def launch(args: argparse.Namespace, mode: str, nproc: int, folder: Path, index: int) -> dict[str, Any]:
    """Run the worker under torchrun (or alone for ``single``) and return rank 0's JSON."""
    result = folder / f"{mode}-{nproc}-{index}.json"
    worker_args = [
        __file__, "--worker", "--mode", mode, "--result", str(result), "--device", args.device,
        "--backbone", args.backbone, "--batch", str(args.batch), "--size", str(args.size),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    if mode == "single":
        command = [sys.executable, *worker_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *worker_args,
        ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{mode} on {nproc} process(es) failed:\n{completed.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel runs (default 2)")
    parser.add_argument("--backbone", default="mit_b0", help="MiT size of DAM-Former (default mit_b0)")
    parser.add_argument("--batch", type=int, default=2, help="source (and target) images per rank")
    parser.add_argument("--size", type=int, default=256, help="aerial side in pixels (default 256 on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per launch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating launches of 1 and N processes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--device cuda --nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s) visible")

    device = torch.device(args.device)
    print(
        f"machine: {machine_description(device)}; DAM-Former {args.backbone} UDA iteration, "
        f"batch {args.batch} + {args.batch} per rank, {args.size} px; one thread per process"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates: dict[str, list[float]] = {"1": [], str(args.nproc): []}
        for index in range(args.rounds):
            rates["1"].append(launch(args, "single", 1, folder, index)["samples_per_s"])
            rates[str(args.nproc)].append(launch(args, "ddp", args.nproc, folder, index)["samples_per_s"])
        memory_runs = {mode: launch(args, mode, args.nproc, folder, 99) for mode in ("ddp", "zero1", "zero2")}

    one, many = statistics.median(rates["1"]), statistics.median(rates[str(args.nproc)])
    efficiency = many / (args.nproc * one)
    print_table(
        f"DDP scaling (median of {args.rounds} alternating launches)",
        ["processes", "samples/s", "speed-up", "efficiency", "launches"],
        [
            ["1", f"{one:.2f}", "1.00x", "-", " ".join(f"{v:.2f}" for v in rates["1"])],
            [
                str(args.nproc), f"{many:.2f}", f"{many / one:.2f}x", f"{efficiency:.0%}",
                " ".join(f"{v:.2f}" for v in rates[str(args.nproc)]),
            ],
        ],
    )  # fmt: skip

    params = memory_runs["ddp"]["ranks"][0]["parameters"]
    ddp_state = max(r["optimizer_state_bytes"] for r in memory_runs["ddp"]["ranks"])
    rows = []
    for mode, run in memory_runs.items():
        state = max(r["optimizer_state_bytes"] for r in run["ranks"])
        peak = max(r["peak_bytes"] for r in run["ranks"])
        theory = 8 if mode == "ddp" else 12 / args.nproc
        cells = [mode, mib(state), f"{state / params:.2f}", f"{theory:.2f}", f"{state / ddp_state:.2f}x"]
        rows.append([*cells, mib(peak), f"{run['samples_per_s']:.2f}"])
    print_table(
        f"memory per rank on {args.nproc} ranks, {params / 1e6:.2f} M parameters (fp32 training)",
        ["engine", "optimiser state MiB", "bytes/param", "theory", "vs DDP", "peak MiB", "samples/s"],
        rows,
    )
    zero2_ratio = float(rows[2][4].rstrip("x"))
    target = 12 / args.nproc / 8
    print(
        f"ZeRO-2 optimiser state / DDP: {zero2_ratio:.2f}x (theory {target:.2f}x on {args.nproc} ranks): "
        f"{verdict(zero2_ratio, target * 1.05)}"
    )
    write_json(
        args.json,
        {
            "machine": machine_description(device),
            "ddp": {"samples_per_s": {"1": one, str(args.nproc): many}, "efficiency": efficiency},
            "memory": memory_runs,
        },
    )


if __name__ == "__main__":
    main()
