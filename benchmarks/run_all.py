"""The benchmark suite (``make bench``): every script in turn, then one table of ratios against targets.

Each script prints its own detailed tables as it goes (shown here) and writes a JSON file; the summary
at the end gathers the ratios. Ratios come from candidates measured side by side in one run; the
absolute times are for orientation only.

    python benchmarks/run_all.py                     # the CPU suite (make bench; time: RESULTS.md)
    python benchmarks/run_all.py --only uda model    # a subset
    python benchmarks/run_all.py --device cuda       # the GPU variants (model, UDA with AMP, compile)
    python benchmarks/run_all.py --out benchmarks/last-run   # keep the JSON files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, verdict

HERE = Path(__file__).resolve().parent

# name -> (script, extra arguments on CPU, on CUDA)
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "loader": ("bench_loader.py", [], []),
    "model": ("bench_model.py", [], ["--device", "cuda", "--batch", "8", "--utae-batch", "32"]),
    "uda": ("bench_uda.py", [], ["--device", "cuda"]),
    "distributed": (
        "bench_distributed.py",
        [],
        ["--device", "cuda", "--size", "512", "--backbone", "mit_b4"],
    ),
}
# Extra UDA runs on a GPU: each AMP dtype, channels_last and torch.compile (issue 9).
GPU_UDA_VARIANTS = [
    ["--precision", "fp16"],
    ["--precision", "bf16"],
    ["--precision", "bf16", "--channels-last"],
    ["--precision", "bf16", "--compile"],
]


def run(name: str, script: str, extra: list[str], out: Path) -> dict[str, Any] | None:
    """Run one script with ``--json``; its output streams through. None (with a message) on failure."""
    target = out / f"{name}.json"
    command = [sys.executable, str(HERE / script), *extra, "--json", str(target)]
    print(f"\n##### {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, check=False)
    print(f"##### {name}: {time.perf_counter() - start:.0f} s, exit {completed.returncode}", flush=True)
    if completed.returncode != 0 or not target.is_file():
        return None
    return json.loads(target.read_text())


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """(measure, ratio, target, verdict) rows from the scripts' JSON files."""
    rows: list[list[str]] = []
    if loader := results.get("loader"):
        ratio = loader["shard_over_raw"]
        rows.append(
            [
                "data: shard loader / raw tree, samples/s per core",
                f"{ratio:.2f}x",
                ">= 5x",
                verdict(ratio, 5.0, at_most=False),
            ]
        )
    if model := results.get("model"):
        for name, entry in model["segmenters"].items():
            if name.startswith("ours+segformer"):
                size = name.split(":")[1]
                for key, label in (("time_vs_hf", "time"), ("memory_vs_hf", "peak memory")):
                    ratio = entry[key]
                    rows.append(
                        [
                            f"model: our {size} / HF SegFormer, fwd+bwd {label}",
                            f"{ratio:.2f}x",
                            "<= 1.0x",
                            verdict(ratio, 1.0),
                        ]
                    )
        utae = model["utae"]
        last = list(utae)[-1]
        growth = utae[last]["growth"]
        dates = int(last.split("T")[1])
        rows.append(
            [
                f"model: U-TAE time T={dates} / T=6",
                f"{growth:.2f}x",
                f"<= {dates / 6:.1f}x (linear)",
                verdict(growth, dates / 6),
            ]
        )
        frames = utae[last]["vs_same_frames_as_batch"]
        rows.append(
            [
                f"model: U-TAE T={dates} / same frames as a T=6 batch",
                f"{frames:.2f}x",
                "<= 1.0x",
                verdict(frames, 1.0),
            ]
        )
    for key in [k for k in results if k.startswith("uda")]:
        uda = results[key]
        ratio = uda["uda_over_supervised"]
        rows.append(
            [
                f"UDA / supervised iteration time ({uda['variant']})",
                f"{ratio:.2f}x",
                "<= 2.5x",
                verdict(ratio, 2.5),
            ]
        )
        if "mfu" in uda:
            rows.append([f"UDA model FLOP utilisation ({uda['variant']})", f"{uda['mfu']:.1%}", "-", "-"])
    if distributed := results.get("distributed"):
        efficiency = distributed["ddp"]["efficiency"]
        rows.append(
            [
                "DDP 2 processes vs 1: scaling efficiency",
                f"{efficiency:.0%}",
                ">= 90% (ours)",
                verdict(efficiency, 0.9, at_most=False),
            ]
        )
        memory = distributed["memory"]
        ddp = max(r["optimizer_state_bytes"] for r in memory["ddp"]["ranks"])
        ranks = memory["ddp"]["world_size"]
        for mode in ("zero1", "zero2"):
            ratio = max(r["optimizer_state_bytes"] for r in memory[mode]["ranks"]) / ddp
            theory = 12 / ranks / 8
            rows.append(
                [
                    f"{mode.upper()} / DDP optimiser state per rank",
                    f"{ratio:.2f}x",
                    f"{theory:.2f}x (theory, {ranks} ranks)",
                    verdict(ratio, theory * 1.05),
                ]
            )
    return rows


# --quick on a GPU (issue 20's targets): DAM-Former MiT-b5, 512 px, T = 12, one UDA iteration per
# precision at batch 8 + 8, and the GPU's busy share at DAFormer's batch 2 + 2.
QUICK_MODEL = ["--device", "cuda", "--backbone", "mit_b5", "--size", "512", "--dates", "12", "--quick"]
QUICK_VARIANTS = {
    "fp32, batch 8": ["--batch", "8", "--precision", "fp32"],
    "fp16, batch 8": ["--batch", "8", "--precision", "fp16"],
    "bf16, batch 8": ["--batch", "8", "--precision", "bf16"],
    "bf16 compiled, batch 8": ["--batch", "8", "--precision", "bf16", "--compile"],
    "bf16, batch 2 (DAFormer's)": ["--batch", "2", "--precision", "bf16"],
}


def quick_gpu(out: Path) -> list[str]:
    """The --quick GPU suite; prints one table. Returns the variants that failed."""
    rows, failed = [], []
    for index, (label, extra) in enumerate(QUICK_VARIANTS.items()):
        result = run(f"quick-{index}", "bench_uda.py", [*QUICK_MODEL, *extra], out)
        if result is None:
            failed.append(label)
            continue
        ms = result["ms_per_iteration"]
        peak = result["peak_bytes"]["uda"] / 2**30
        rows.append(
            [label, f"{ms['uda']:.0f}", f"{ms['supervised']:.0f}", f"{result['uda_over_supervised']:.2f}x",
             f"{result.get('mfu', float('nan')):.1%}", f"{result.get('gpu_busy', float('nan')):.0%}",
             f"{peak:.1f}"]
        )  # fmt: skip
    print_table(
        "DAM-Former MiT-b5, 512 px, T=12, one UDA iteration (targets: MFU >= 25% bf16 batch 8, UDA / "
        "supervised <= 2.4x, GPU busy >= 90% at batch 2)",
        ["variant", "UDA ms", "sup. ms", "UDA/sup", "MFU", "GPU busy", "peak GiB"],
        rows,
    )
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these benchmarks")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, help="keep the JSON results in this folder")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --device cuda: only the UDA iteration per precision (fp32, fp16, bf16, compiled bf16) "
        "and the busy share at batch 2, in minutes",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        if args.device != "cuda":
            parser.error("--quick measures GPU figures: use it with --device cuda")
        with tempfile.TemporaryDirectory() as tmp:
            failed = quick_gpu(args.out or Path(tmp))
        print(f"\n--quick took {time.perf_counter() - started:.0f} s")
        if failed:
            sys.exit(f"variants that failed: {', '.join(failed)} (their output is above)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        failed = []
        for name in args.only or list(SUITE):
            script, cpu_args, cuda_args = SUITE[name]
            result = run(name, script, cuda_args if args.device == "cuda" else cpu_args, out)
            if result is None:
                failed.append(name)
                continue
            results[name] = result
            if name == "uda" and args.device == "cuda":
                for index, variant in enumerate(GPU_UDA_VARIANTS):
                    extra = run(f"uda-{index}", script, [*cuda_args, *variant], out)
                    if extra is None:
                        failed.append(f"uda {' '.join(variant)}")
                    else:
                        results[f"uda-{index}"] = extra
    print_table(
        f"summary ({args.device}, {time.perf_counter() - started:.0f} s)",
        ["measure", "ratio", "target", "verdict"],
        summary_rows(results),
    )
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()
