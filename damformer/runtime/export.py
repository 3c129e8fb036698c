"""``damformer export``: a trained model as a colleague needs it (see :mod:`damformer.runtime.model_files`).

damformer export --checkpoint runs/demo/damformer/checkpoint.pt --out exported/damformer
damformer export --checkpoint CKPT --out DIR --torchscript --trace-size 512    # + a TorchScript file
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damformer import __version__
from damformer.atomic import atomic_path, atomic_write_bytes, check_writable_folder
from damformer.data.classes import FLAIR_CLASSES
from damformer.data.sentinel import S2_PIXEL_M
from damformer.errors import OptionError
from damformer.runtime.artifacts import RunFolder, load_checkpoint
from damformer.runtime.model_files import (
    CARD_NAME,
    CONFIG_NAME,
    EXPORT_FORMAT,
    TORCHSCRIPT_NAME,
    WEIGHTS_NAME,
    ExportError,
    open_model,
)

AERIAL_PIXEL_M = 0.2


def export_command(args: argparse.Namespace) -> int:
    """Write the export folder and say what is in it."""
    if args.trace_size < 32 or args.trace_size % 32:
        raise OptionError(f"--trace-size {args.trace_size}: expected a multiple of 32 (e.g. 512)")
    written = export_model(
        args.checkpoint, args.out, teacher=args.teacher, torchscript=args.torchscript,
        trace_size=args.trace_size, overwrite=args.overwrite,
    )  # fmt: skip
    size = sum(path.stat().st_size for path in written)
    print(f"{args.out}: {', '.join(path.name for path in written)} ({size / 1e6:.1f} MB)")
    return 0


def export_model(
    checkpoint: Path,
    out: Path,
    *,
    teacher: bool = False,
    torchscript: bool = False,
    trace_size: int = 512,
    overwrite: bool = False,
) -> list[Path]:
    """Export the student (or teacher) of ``checkpoint`` into ``out``; returns the files written.

    Raises:
        ExportError: ``out`` exists (without ``overwrite``).
        CheckpointError, ConfigError: as :func:`damformer.runtime.model_files.open_model`.
    """
    from safetensors.torch import save_file

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty; pass --overwrite or choose another --out")
    check_writable_folder(out, "--out")
    loaded = open_model(checkpoint, teacher=teacher)
    state = load_checkpoint(loaded.source)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "damformer": __version__})
        tmp.chmod(0o644)  # readable by the colleagues it is for
    record = {
        "format": EXPORT_FORMAT,
        "damformer": __version__,
        "model": state["config"]["model"] | {"pretrained": None},
        "network": "teacher" if teacher else "student",
        "iteration": loaded.iteration,
        "classes": [{"value": c.index, "name": c.name, "rgb": list(c.rgb)} for c in FLAIR_CLASSES],
        "inputs": _inputs(loaded.model, loaded.config),
        "s2_mean": loaded.s2_mean,
    }
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(record, indent=1).encode())
    atomic_write_bytes(out / CARD_NAME, model_card(state, loaded, teacher=teacher).encode())
    written = [out / WEIGHTS_NAME, out / CONFIG_NAME, out / CARD_NAME]
    if torchscript:
        written.append(_torchscript(loaded.model, loaded.config, out / TORCHSCRIPT_NAME, trace_size))
    return written


def _inputs(model: nn.Module, config: Any) -> dict[str, Any]:
    """How raw inputs are normalised inside the model (what a user must feed it)."""
    return {
        "aerial": "uint8 0..255, bands R, G, B" + (", NIR, elevation" if config.bands == "rgbne" else ""),
        "aerial_mean": [float(v) for v in model.mean.flatten()],
        "aerial_std": [float(v) for v in model.std.flatten()],
        "s2": "L2A reflectance x 10000, 10 bands, clipped at 0 and divided by 10000"
        if config.temporal
        else None,
        "s2_days": "day offsets from May 15 of the year most dates fall in" if config.temporal else None,
        "footprint": config.footprint if config.temporal else None,
    }


class _Logits(nn.Module):
    """The HR logits alone: what TorchScript traces (the model returns a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs)["hr"]


def example_inputs(config: Any, size: int, dates: int = 12) -> tuple[torch.Tensor, ...]:
    """Inputs of ``size`` x ``size`` aerial pixels (and, for +T, the Sentinel-2 crop that size implies)."""
    aerial = torch.randint(0, 256, (1, 5, size, size), dtype=torch.uint8)
    if not config.temporal:
        return (aerial,)
    crop = max(2, round(size * AERIAL_PIXEL_M / (config.footprint * S2_PIXEL_M) / 2) * 2)
    s2 = torch.rand(1, dates, config.s2_bands, crop, crop) * 3000
    return aerial, s2, torch.ones(1, dates, dtype=torch.bool), torch.arange(dates)[None] * 30 - 130


def _torchscript(model: nn.Module, config: Any, path: Path, size: int) -> Path:
    """``model.torchscript.pt``: traced on ``size`` px inputs (the size it then expects)."""
    with warnings.catch_warnings():  # shape-dependent branches become constants: the documented size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_Logits(model).eval(), example_inputs(config, size), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
        tmp.chmod(0o644)
    return path


def model_card(state: dict[str, Any], loaded: Any, *, teacher: bool) -> str:
    """The README.md of an export: what the model is, what it was trained on, how well it does where."""
    config, data, uda, optim = (
        state["config"],
        state["config"]["data"],
        state["config"]["uda"],
        state["config"]["optim"],
    )
    scores = _scores(loaded.source, state)
    lines = [
        f"# {loaded.config.name} ({'EMA teacher' if teacher else 'student'})",
        "",
        "Exported by damformer " + __version__ + f" from `{loaded.source}` (iteration {loaded.iteration}).",
        "",
        "## Data",
        f"- source (labelled): {', '.join(data['source']) or '-'}; "
        f"domains: {data.get('source_domains') or 'all'}",
        f"- target (unlabelled): {', '.join(data['target']) or '-'}; "
        f"domains: {data.get('target_domains') or 'all'}",
        f"- target test: {', '.join(data['target_test']) or '-'}",
        "",
        "## Recipe",
        f"- training: {'UDA self-training' if uda['enabled'] else 'source only'}; "
        f"{optim['max_iters']} iterations",
        f"- global batch: {data.get('global_batch') or 'per process: ' + str(data.get('batch_size'))}; "
        f"lr {optim['lr']}; warmup {optim['warmup']}",
        f"- encoder: {loaded.config.mit_size if loaded.config.arch != 'unet_c' else 'CNN'}; pretrained: "
        f"{config['model'].get('pretrained')}",
        "",
        "## Scores",
        *scores,
        "",
        f"## Code\n- damformer commit: {state.get('git_commit', 'unknown')}",
        "",
        "## Use",
        "```python",
        "import damformer",
        'model = damformer.load_model("PATH/TO/THIS/FOLDER")  # eval mode; or damformer predict --checkpoint',
        "```",
    ]
    return "\n".join(lines) + "\n"


def _scores(checkpoint: Path, state: dict[str, Any]) -> list[str]:
    """The run's final scores and their split (scores.json beside the checkpoint, else its evaluations)."""
    path = RunFolder(checkpoint.parent).scores
    found = json.loads(path.read_text()) if path.is_file() else None
    if found is None and state.get("evaluations"):
        found = state["evaluations"][-1]
    if found is None:
        return ["- not evaluated"]
    lines = [
        f"- target test split: mIoU {100 * found['miou']:.2f} (13 classes), "
        f"accuracy {100 * found['accuracy']:.2f}"
    ]
    if found.get("validation"):
        lines.append(f"- target validation split: mIoU {100 * found['validation']['miou']:.2f}")
    return lines
