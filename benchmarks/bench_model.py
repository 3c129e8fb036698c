"""Model speed and memory: our MiT + heads vs Hugging Face SegFormer, and U-TAE against the series length.

1. Forward + backward (cross-entropy on logits upsampled to the input size) at 512 x 512, for MiT-b0,
   b2 and b5:

   * ``ours+segformer``: our ``MixTransformer`` + our SegFormer all-MLP head;
   * ``hf``: ``transformers.SegformerForSemanticSegmentation`` with the identical configuration (same
     widths, depths, heads, reduction ratios, head width, stochastic depth 0.1, dropout 0.1 before the
     classifier as in our head, no other dropout);
   * ``ours+daformer``: our MiT + the DAFormer context-aware head (what the DAFormer baseline trains;
     Hugging Face has no such head, so its ratio to ``hf`` is for orientation, not a like-for-like test).

   Target: ours <= 1.0x the reference in time and in peak memory.

2. U-TAE (our temporal branch) forward + backward for T = 6, 12 and 24 dates: time must grow linearly
   or better (T=24 / T=6 <= 4.0x). Each is also timed against the same number of frames given as a
   bigger batch of T=6 series: that ratio is the cost of the time dimension itself (<= 1.0x: time
   costs no more than batch), apart from the cost of a bigger working set (CPU caches).

    python benchmarks/bench_model.py                        # CPU: about 5 minutes on 2 cores
    python benchmarks/bench_model.py --sizes mit_b0 --rounds 2
    python benchmarks/bench_model.py --profile ours+segformer:mit_b0 hf:mit_b0   # where the time goes
    python benchmarks/bench_model.py --device cuda --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Step,
    StepFactory,
    add_common_arguments,
    child_peak_bytes,
    interleaved_seconds,
    machine_description,
    mib,
    print_table,
    run_memory_case,
    setup,
    synchronize,
    verdict,
    write_json,
)

from damformer.models.heads import DAFormerHead, SegFormerHead
from damformer.models.mit import MIT_SPECS, MixTransformer
from damformer.models.utae import UTAE

NUM_CLASSES = 13
SIZE = 512
S2_SIZE = 40  # the Sentinel-2 crop the FLAIR-2 configs read
DATES = (6, 12, 24)


def head_width(size: str) -> int:
    """SegFormer's decoder width: 256 for b0, 768 for the others (as in the released configs)."""
    return 256 if size == "mit_b0" else 768


class OursSegmenter(nn.Module):
    """Our MiT encoder and one of our heads, logits upsampled to the input (what training computes)."""

    def __init__(self, size: str, head: str) -> None:
        super().__init__()
        self.encoder = MixTransformer(size, in_chans=3, drop_path=0.1)
        dims = self.encoder.embed_dims
        if head == "segformer":
            self.head: nn.Module = SegFormerHead(dims, NUM_CLASSES, width=head_width(size))
        else:
            self.head = DAFormerHead(dims, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class HuggingFaceSegmenter(nn.Module):
    """``SegformerForSemanticSegmentation`` with our size's configuration, returning its logits."""

    def __init__(self, size: str) -> None:
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        spec = MIT_SPECS[size]
        config = SegformerConfig(
            num_channels=3,
            hidden_sizes=list(spec.embed_dims),
            depths=list(spec.depths),
            num_attention_heads=list(spec.num_heads),
            sr_ratios=list(spec.sr_ratios),
            mlp_ratios=[spec.mlp_ratio] * 4,
            decoder_hidden_size=head_width(size),
            num_labels=NUM_CLASSES,
            drop_path_rate=0.1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout_prob=0.1,  # our heads' Dropout2d(0.1) before the classifier
        )
        self.model = SegformerForSemanticSegmentation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for fp16/bf16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def segmenter_factory(kind: str, size: str, args: argparse.Namespace, device: torch.device) -> StepFactory:
    """A factory of one training step (forward, loss at full resolution, backward) of one segmenter."""

    def factory() -> Step:
        torch.manual_seed(0)
        if kind == "hf":
            model: nn.Module = HuggingFaceSegmenter(size)
        else:
            model = OursSegmenter(size, kind.split("+")[1])
        model = model.to(device).train()
        images = torch.randn(args.batch, 3, SIZE, SIZE, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch, SIZE, SIZE), device=device)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                logits = model(images)
                logits = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            F.cross_entropy(logits.float(), labels).backward()

        return step

    return factory


def utae_factory(dates: int, batch: int, args: argparse.Namespace, device: torch.device) -> StepFactory:
    """A factory of one U-TAE forward + backward on ``batch`` series of ``dates`` dates (40 x 40 crops)."""

    def factory() -> Step:
        torch.manual_seed(0)
        model = UTAE(10, encoder_widths=[64, 64, 128, 128], decoder_widths=[64, 64, 128, 128]).to(device)
        s2 = torch.rand(batch, dates, 10, S2_SIZE, S2_SIZE, device=device)
        mask = torch.ones(batch, dates, dtype=torch.bool, device=device)
        days = torch.linspace(0, 360, dates, device=device).expand(batch, dates).contiguous()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                out = model(s2, mask, days)
            out.float().square().mean().backward()

        return step

    return factory


def all_cases(args: argparse.Namespace, device: torch.device) -> dict[str, StepFactory]:
    """Every measurable case, by name (also the names the memory child processes take)."""
    cases: dict[str, StepFactory] = {}
    for size in args.sizes:
        for kind in ("ours+segformer", "hf", "ours+daformer"):
            cases[f"{kind}:{size}"] = segmenter_factory(kind, size, args, device)
    for dates in DATES:
        cases[f"utae:T{dates}"] = utae_factory(dates, args.utae_batch, args, device)
        batch = args.utae_batch * dates // DATES[0]
        cases[f"utae:T{DATES[0]}xB{batch}"] = utae_factory(DATES[0], batch, args, device)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["mit_b0", "mit_b2", "mit_b5"],
        choices=sorted(MIT_SPECS),
        metavar="SIZE",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per step at 512 x 512 (default 1)")
    parser.add_argument("--utae-batch", type=int, default=4, help="samples per U-TAE step (default 4)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--profile",
        nargs="+",
        metavar="CASE",
        help="instead of the benchmark, print torch.profiler's top operators of these cases, e.g. "
        "ours+segformer:mit_b0 hf:mit_b0 (names as in the tables)",
    )
    args = parser.parse_args()
    device = setup(args)
    cases = all_cases(args, device)
    if args.memory_case:
        run_memory_case(cases, args.memory_case, device)
        return
    if args.profile:
        unknown = [name for name in args.profile if name not in cases]
        if unknown:
            parser.error(f"--profile: unknown case {', '.join(unknown)}; known: {', '.join(cases)}")
        for name in args.profile:
            print_profile(name, cases[name](), device, steps=args.rounds)
        return

    print(f"machine: {machine_description(device)}; precision {args.precision}; batch {args.batch}")
    results: dict[str, dict] = {"segmenters": {}, "utae": {}}
    rows = []
    for size in args.sizes:
        names = [f"{kind}:{size}" for kind in ("ours+segformer", "hf", "ours+daformer")]
        steps = {name: cases[name]() for name in names}
        seconds = interleaved_seconds(steps, device, rounds=args.rounds)
        del steps
        peaks = {name: child_peak_bytes(__file__, name, args, _child_args(args)) for name in names}
        hf = names[1]
        for name in names:
            time_ratio, memory_ratio = seconds[name] / seconds[hf], peaks[name] / peaks[hf]
            target = "reference" if name == hf else "-"
            if name.startswith("ours+segformer"):
                target = f"time {verdict(time_ratio, 1.0)}, memory {verdict(memory_ratio, 1.0)}"
            rows.append(
                [
                    name,
                    f"{seconds[name] * 1e3:.0f}",
                    f"{time_ratio:.2f}x",
                    mib(peaks[name]),
                    f"{memory_ratio:.2f}x",
                    target,
                ]
            )
            results["segmenters"][name] = {
                "seconds": seconds[name],
                "peak_bytes": peaks[name],
                "time_vs_hf": time_ratio,
                "memory_vs_hf": memory_ratio,
            }
    print_table(
        f"forward + backward at {SIZE} x {SIZE}, batch {args.batch} (against Hugging Face, same config)",
        ["model:size", "ms/step", "time", "peak MiB", "memory", "target <= 1.0x"],
        rows,
    )

    # The same frames as a bigger batch of T=6 series tells the cost of time apart from the cost of size.
    names = [f"utae:T{dates}" for dates in DATES]
    same_frames = {dates: f"utae:T{DATES[0]}xB{args.utae_batch * dates // DATES[0]}" for dates in DATES[1:]}
    steps = {name: cases[name]() for name in [*names, *same_frames.values()]}
    seconds = interleaved_seconds(steps, device, rounds=args.rounds, repeats=2)
    del steps
    peaks = {name: child_peak_bytes(__file__, name, args, _child_args(args)) for name in names}
    rows = []
    for dates, name in zip(DATES, names, strict=True):
        growth = seconds[name] / seconds[names[0]]
        linear = dates / DATES[0]
        frames = seconds[name] / seconds[same_frames[dates]] if dates in same_frames else 1.0
        rows.append(
            [name, f"{seconds[name] * 1e3:.0f}", f"{growth:.2f}x", f"{linear:.1f}x", verdict(growth, linear),
             f"{frames:.2f}x", mib(peaks[name])]
        )  # fmt: skip
        results["utae"][name] = {
            "seconds": seconds[name],
            "peak_bytes": peaks[name],
            "growth": growth,
            "vs_same_frames_as_batch": frames,
        }
    print_table(
        f"U-TAE forward + backward, batch {args.utae_batch}, {S2_SIZE} x {S2_SIZE} crops (against T=6)",
        ["dates", "ms/step", "time", "linear", "linear or better", "vs same frames as T=6 batch", "peak MiB"],
        rows,
    )
    write_json(args.json, {"machine": machine_description(device), "precision": args.precision, **results})


def print_profile(name: str, step: Step, device: torch.device, *, steps: int) -> None:
    """The operators that take the time of one case's step (self time, summed over ``steps`` steps)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: first-call allocations and kernel selection stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== {name}: {steps} steps, operators by self time")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=48))


def _child_args(args: argparse.Namespace) -> list[str]:
    return [
        "--sizes", *args.sizes, "--batch", str(args.batch), "--utae-batch", str(args.utae_batch),
        "--precision", args.precision,
    ]  # fmt: skip


if __name__ == "__main__":
    main()
