"""The paper's visual comparison: one target test patch, GT | RGB | NIR | elevation | every configuration.

The patch is the study's ``figure.patch``, or by default the target test patch with the most building
pixels (urban patches show the differences between the networks best). Each configuration predicts it
with the checkpoint of its first finished seed. The PNG has a fixed size for a given number of panels
(:func:`figure_size`): 4 columns up to 12 panels, then 5.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from damformer.data.classes import FLAIR_CLASSES
from damformer.eval.evaluate import eval_mode
from damformer.eval.figures import IGNORE_RGB, _pyplot, colourise, save_figure, scale_bar
from damformer.loading.augment import training_sample
from damformer.loading.collate import collate_samples
from damformer.models.damformer import predict_logits
from damformer.runtime.artifacts import RunFolder
from damformer.shards.shardset import ShardSet
from damformer.study.results import EntryRow
from damformer.study.spec import Study, StudyError

FIGURE_PNG = "figure.png"
PANEL_PX = (240, 260)  # width, height of one panel (image + its title)
LEGEND_PX = 110
TITLE_PX = 24  # the study's title, above the first row's panel titles
DPI = 100
BUILDING = 0


def figure_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure for ``panels`` panels."""
    columns = 4 if panels <= 12 else 5
    rows = math.ceil(panels / columns)
    return columns * PANEL_PX[0], rows * PANEL_PX[1] + LEGEND_PX + TITLE_PX


def choose_patch(test_set: ShardSet, requested: str | None) -> str:
    """``requested``, or the patch with the most building pixels (ties: the first id)."""
    counts = test_set.class_pixels()
    if not counts:
        raise StudyError("the target test shards hold no labels: the figure needs a labelled patch")
    if requested is not None:
        if requested not in counts:
            raise StudyError(f"figure.patch {requested!r} is not a target test patch (e.g. {min(counts)})")
        return requested
    return max(sorted(counts), key=lambda key: counts[key][BUILDING])


@torch.no_grad()
def _predict(checkpoint: Path, batch: dict) -> np.ndarray:
    from damformer.runtime.model_files import load_model

    model = load_model(checkpoint)
    with eval_mode(model):
        return predict_logits(model, batch).argmax(dim=1)[0].numpy()


def write_figure(study: Study, rows: list[EntryRow], test_dirs: list[str], domains: list[str] | None) -> Path:
    """Draw the figure into ``OUTPUT/figure.png`` (atomically) and return its path."""
    test_set = ShardSet(test_dirs, domains=domains)
    key = choose_patch(test_set, study.figure_patch)
    sample = test_set.sample(key)
    batch = collate_samples([training_sample(sample)])
    aerial, pixel_m = sample.aerial, abs(float(sample.transform.a))
    panels: list[tuple[str, np.ndarray | None, str | None]] = [
        ("ground truth", colourise(sample.label, FLAIR_CLASSES), None),
        ("RGB", np.ascontiguousarray(aerial[:3].transpose(1, 2, 0)), None),
        ("NIR", aerial[3], "gray"),
        ("elevation", aerial[4], "viridis"),
    ]
    for row in rows:
        title = f"{row.model} {row.inputs}" + ("" if row.training == "UDA" else " (source)")
        if not row.runs:
            panels.append((f"{title}\n(not finished)", None, None))
            continue
        first = min(row.runs, key=lambda score: score.run.seed)
        prediction = _predict(RunFolder(first.run.output_dir).checkpoint, batch)
        caption = f"{title}\n{row.name}, mIoU {100 * first.miou:.1f} (seed {first.run.seed})"
        panels.append((caption, colourise(prediction, FLAIR_CLASSES), None))
    title = f"{study.name}: target test patch {key}; mIoU over the whole test split"
    return _draw(panels, study.output_dir / FIGURE_PNG, title=title, pixel_m=pixel_m)


def _draw(
    panels: list[tuple[str, np.ndarray | None, str | None]], path: Path, *, title: str, pixel_m: float
) -> Path:
    plt = _pyplot()
    from matplotlib.patches import Patch

    width, height = figure_size(len(panels))
    columns = 4 if len(panels) <= 12 else 5
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= len(panels):
            ax.axis("off")
            continue
        name, image, cmap = panels[index]
        if image is None:
            ax.text(0.5, 0.5, "no checkpoint", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        else:
            shown = ax.imshow(image, cmap=cmap, interpolation="nearest")
            if name == "RGB":
                scale_bar(ax, pixel_m=pixel_m, width_px=image.shape[1])
            if name == "elevation":  # FLAIR-2 stores it scaled to 0..255
                bar = figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
                bar.ax.tick_params(labelsize=6)
                bar.set_label("elevation (0..255)", fontsize=6)
        ax.set_title(name, fontsize=7)
    handles = [Patch(facecolor=np.array(c.rgb) / 255, edgecolor="grey", label=c.name) for c in FLAIR_CLASSES]
    handles.append(Patch(facecolor=np.array(IGNORE_RGB) / 255, edgecolor="grey", label="unlabelled"))
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=9, y=1 - 6 / height, va="top")
    top = 1 - (TITLE_PX + 22) / height  # 22 px: the first row's panel titles
    bottom = LEGEND_PX / height
    figure.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, hspace=0.35, wspace=0.05)
    # PNG, and PDF/SVG for papers; no bbox_inches: the size stays figure_size()
    return save_figure(figure, path, vector=True, dpi=DPI, bbox_inches=None)[0]
