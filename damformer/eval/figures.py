"""PNG figures for runs: the confusion matrix and a mosaic of target patches (RGB | label | prediction).

Both carry the FLAIR class names and colours, so a PNG is readable on its own (in the MLflow UI, a
report, a chat). Written with matplotlib's Agg backend (no display) to a temporary file, then renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damformer.atomic import atomic_path
from damformer.data.classes import LandCoverClass

IGNORE_INDEX = 255
IGNORE_RGB = (255, 255, 255)  # unlabelled pixels: white, listed in the legend


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


VECTOR_SUFFIXES = (".pdf", ".svg")  # for papers: the same figure, scalable


def save_figure(figure: Any, path: Path, *, vector: bool = False, **savefig: Any) -> list[Path]:
    """Write ``figure`` to ``path`` (atomically) and, with ``vector``, beside it as PDF and SVG; close it."""
    written = [path, *(path.with_suffix(suffix) for suffix in VECTOR_SUFFIXES if vector)]
    try:
        for target in written:
            with atomic_path(target, keep_suffix=True) as tmp:  # matplotlib picks the format from the suffix
                figure.savefig(tmp, **{"dpi": 110, "bbox_inches": "tight", **savefig})
    finally:
        _pyplot().close(figure)
    return written


def _save(figure: Any, path: Path) -> Path:
    return save_figure(figure, path)[0]


def scale_bar(ax: Any, *, pixel_m: float, width_px: int, colour: str = "white") -> None:
    """A bar of a round length (about a fifth of the image) in its lower left corner, labelled in metres."""
    target = width_px * pixel_m / 5
    metres = next(m for m in (1000, 500, 200, 100, 50, 20, 10, 5, 2, 1) if m <= max(target, 1))
    length = metres / pixel_m
    x0, y0 = 0.05 * width_px, 0.92 * width_px
    ax.plot([x0, x0 + length], [y0, y0], color=colour, linewidth=3, solid_capstyle="butt")
    ax.text(x0 + length / 2, y0 - 0.03 * width_px, f"{metres:g} m", color=colour, ha="center", va="bottom",
            fontsize=7)  # fmt: skip


def colourise(labels: np.ndarray, classes: Sequence[LandCoverClass]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 with the class colours; 255 (ignore) is white."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[IGNORE_INDEX] = IGNORE_RGB
    for cls in classes:
        palette[cls.index] = cls.rgb
    return palette[np.asarray(labels, dtype=np.uint8)]


def confusion_png(
    matrix: np.ndarray,
    classes: Sequence[LandCoverClass],
    path: Path,
    *,
    title: str = "",
    vector: bool = False,
) -> Path | list[Path]:
    """Row-normalised confusion matrix (each row: where that class's pixels went), in percent.

    Rows are the true classes, columns the predicted ones; a class with no labelled pixels has an
    empty row. Cell text is the percentage; the row label also gives the pixel count.
    """
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, 100.0 * counts / totals, np.nan)
    n = len(classes)
    figure, axes = plt.subplots(figsize=(0.62 * n + 4, 0.55 * n + 2.5))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    names = [cls.name for cls in classes]
    axes.set_xticks(range(n), names, rotation=50, ha="right", fontsize=8)
    row_names = [f"{name} ({int(total):,} px)" for name, total in zip(names, totals[:, 0], strict=True)]
    axes.set_yticks(range(n), row_names, fontsize=8)
    for tick, cls in zip(axes.get_xticklabels(), classes, strict=True):
        tick.set_bbox({"facecolor": np.array(cls.rgb) / 255, "alpha": 0.35, "pad": 1, "edgecolor": "none"})
    for tick, cls in zip(axes.get_yticklabels(), classes, strict=True):
        tick.set_bbox({"facecolor": np.array(cls.rgb) / 255, "alpha": 0.35, "pad": 1, "edgecolor": "none"})
    for row in range(n):
        for col in range(n):
            value = shares[row, col]
            if np.isfinite(value) and value >= 0.5:
                colour = "white" if value > 60 else "black"
                axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (pixels)")
    axes.set_title(title or "confusion matrix, % of each true class", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.04, label="% of the row")
    return save_figure(figure, path, vector=True) if vector else _save(figure, path)


def mosaic_png(
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    classes: Sequence[LandCoverClass],
    path: Path,
    *,
    titles: Sequence[str] | None = None,
    heading: str = "",
    pixel_m: float | None = None,
) -> Path:
    """A grid with one patch per row: aerial RGB | label | prediction, and a class colour legend.

    Args:
        rows: (RGB (H, W, 3) uint8, label (H, W) or None, prediction (H, W)) per patch.
        classes: the classes (names, colours) of the label values.
        path: the PNG to write.
        titles: a caption per row (e.g. the patch id and its domain); optional.
        heading: the figure's title (e.g. the model and its mIoU).
        pixel_m: the aerial pixel size: a scale bar on every RGB panel.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    height = 2.5 * len(rows) + 1.0  # inches: a row per patch, and the legend's four lines
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, height), squeeze=False)
    for index, (rgb, label, prediction) in enumerate(rows):
        panels = (
            (rgb, "aerial RGB"),
            (colourise(label, classes) if label is not None else None, "label"),
            (colourise(prediction, classes), "prediction"),
        )
        for column, (image, name) in enumerate(panels):
            ax = axes[index, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.text(0.5, 0.5, "no label", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(image, interpolation="nearest")
                if column == 0 and pixel_m:
                    scale_bar(ax, pixel_m=pixel_m, width_px=image.shape[1])
            caption = name if titles is None else f"{titles[index]}: {name}"
            ax.set_title(caption, fontsize=8)
    if heading:
        figure.suptitle(heading, fontsize=9)
    handles = [Patch(facecolor=np.array(cls.rgb) / 255, edgecolor="grey", label=cls.name) for cls in classes]
    handles.append(Patch(facecolor=np.array(IGNORE_RGB) / 255, edgecolor="grey", label="unlabelled"))
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    top = 1.0 - (0.55 if heading else 0.25) / height
    figure.subplots_adjust(bottom=1.0 / height, top=top, hspace=0.25, wspace=0.05)
    return _save(figure, path)
