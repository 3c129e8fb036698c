"""The study's tables: one row per configuration, mean ± standard deviation over its seeds.

Two mIoU conventions, as FLAIR-2 reports: over the 13 classes, and over 12 (without "other"). The
standard deviation is the sample one (n - 1) over the finished seeds; with one seed it is not given.
Written as Markdown (``results.md``) and CSV (``results.csv`` per configuration, ``runs.csv`` per run,
``comparisons.csv`` per paired comparison when the study file has ``compare``: see
:mod:`damformer.study.paired`).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from damformer.atomic import atomic_write_bytes
from damformer.data.classes import FLAIR_CLASSES
from damformer.study.paired import METRICS, PairedResult, compare_rows, format_p
from damformer.study.spec import Study, StudyRun
from damformer.study.state import FINISHED, read_scores

RESULTS_MD, RESULTS_CSV, RUNS_CSV = "results.md", "results.csv", "runs.csv"
COMPARISONS_CSV = "comparisons.csv"


@dataclass
class RunScores:
    """One finished run's scores (fractions)."""

    run: StudyRun
    miou: float
    miou_without_other: float
    accuracy: float
    iou: list[float]
    val_miou: float = math.nan  # mIoU 13 on data.target_val, when the run had one


@dataclass
class EntryRow:
    """One configuration of the study, over its seeds."""

    name: str
    model: str
    inputs: str
    training: str
    runs: list[RunScores] = field(default_factory=list)
    expected: int = 0  # seeds asked for

    def stats(self, values: list[float]) -> tuple[float, float]:
        """(mean, sample std) in percent; std NaN with fewer than two values."""
        array = 100 * np.asarray(values, dtype=np.float64)
        if array.size == 0:
            return math.nan, math.nan
        std = float(np.std(array, ddof=1)) if array.size > 1 else math.nan
        return float(np.mean(array)), std

    @property
    def miou(self) -> tuple[float, float]:
        """MIoU over every class (13), mean and std in percent."""
        return self.stats([r.miou for r in self.runs])

    @property
    def miou_without_other(self) -> tuple[float, float]:
        """MIoU without "other" (12 classes), mean and std in percent."""
        return self.stats([r.miou_without_other for r in self.runs])

    @property
    def val_miou(self) -> tuple[float, float]:
        """MIoU 13 on the validation split (data.target_val), mean and std in percent (NaN without)."""
        return self.stats([r.val_miou for r in self.runs if not math.isnan(r.val_miou)])

    @property
    def accuracy(self) -> tuple[float, float]:
        """Overall accuracy, mean and std in percent."""
        return self.stats([r.accuracy for r in self.runs])

    def class_iou(self) -> list[float]:
        """IoU per class, mean over the seeds in percent (NaN where no seed scored the class)."""
        if not self.runs:
            return [math.nan] * len(FLAIR_CLASSES)
        matrix = 100 * np.asarray([r.iou for r in self.runs], dtype=np.float64)
        with warnings.catch_warnings():  # a class no seed scored: NaN, said by "-" in the table
            warnings.simplefilter("ignore", RuntimeWarning)
            return [float(v) if np.isfinite(v) else math.nan for v in np.nanmean(matrix, axis=0)]


def collect_rows(study: Study, statuses: dict[str, str]) -> list[EntryRow]:
    """A row per entry of the study, with the scores of its finished runs."""
    rows = []
    for entry in study.entries:
        runs = [run for run in study.runs if run.entry is entry]
        config = study.resolved_config(runs[0])
        row = EntryRow(
            entry.name,
            config.model.name.rsplit(" ", 1)[0],
            config.model.inputs,
            "UDA" if config.uda.enabled else "source only",
            expected=len(runs),
        )
        for run in runs:
            scores = read_scores(run) if statuses[run.key] == FINISHED else None
            if scores is None:
                continue
            iou = [math.nan if v is None else float(v) for v in scores["iou"]]
            without_other = scores.get("miou_without_other")
            if without_other is None:  # scores.json of an older damformer: computed the same way here
                kept = np.asarray(iou[:-1])
                without_other = float(np.nanmean(kept)) if np.isfinite(kept).any() else math.nan
            validation = scores.get("validation") or {}
            val_miou = float(validation["miou"]) if validation.get("miou") is not None else math.nan
            row.runs.append(
                RunScores(
                    run, float(scores["miou"]), float(without_other), float(scores["accuracy"]), iou, val_miou
                )
            )
        rows.append(row)
    return rows


def _pm(value: tuple[float, float]) -> str:
    mean, std = value
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(study: Study, rows: list[EntryRow]) -> str:
    """The two Markdown tables: summary per configuration, then IoU per class."""
    seeds = ", ".join(map(str, study.seeds))
    own = [f"{e.name}: {', '.join(map(str, e.seeds))}" for e in study.entries if e.seeds is not None]
    if own:
        seeds += f" (rows with seeds of their own: {'; '.join(own)})"
    lines = [
        f"# Study {study.name}",
        "",
        f"Target test split; mean ± sample standard deviation over seeds {seeds} (percent). "
        'mIoU 13: every class; mIoU 12: without "other", as FLAIR-2 reports.',
        "",
        "| configuration | model | inputs | training | seeds | mIoU 13 | mIoU 12 | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with_val = any(not math.isnan(r.val_miou) for row in rows for r in row.runs)
    if with_val:
        lines[2] += " Val: mIoU 13 on the validation split (data.target_val), for choosing recipes."
        lines[4] += " val mIoU 13 |"
        lines[5] += "---|"
    for row in rows:
        lines.append(
            f"| {row.name} | {row.model} | {row.inputs} | {row.training} | {len(row.runs)}/{row.expected} | "
            f"{_pm(row.miou)} | {_pm(row.miou_without_other)} | {_pm(row.accuracy)} |"
            + (f" {_pm(row.val_miou)} |" if with_val else "")
        )
    names = [cls.name for cls in FLAIR_CLASSES]
    lines += ["", "IoU per class (mean over seeds, percent):", ""]
    lines.append("| configuration | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for row in rows:
        values = ["-" if math.isnan(v) else f"{v:.1f}" for v in row.class_iou()]
        lines.append(f"| {row.name} | " + " | ".join(values) + " |")
    lines += paired_markdown(paired_results(study, rows))
    return "\n".join(lines) + "\n"


def paired_results(study: Study, rows: list[EntryRow]) -> list[list[PairedResult]]:
    """Per comparison of the study file, one :class:`PairedResult` per metric (primary first)."""
    by_seed = {row.name: {score.run.seed: score for score in row.runs} for row in rows}
    return [
        [compare_rows(row, baseline, by_seed, metric) for metric, _ in METRICS]
        for row, baseline in study.comparisons
    ]


def paired_markdown(results: list[list[PairedResult]]) -> list[str]:
    """The paired-comparison table's Markdown lines (empty without comparisons)."""
    if not results:
        return []
    lines = [
        "",
        "Paired comparisons over the seeds both rows finished: difference row - baseline in percentage "
        "points, mean ± paired standard deviation, seeds the row won, and the exact two-sided sign-flip "
        "p-value. Primary metric: mIoU 13; secondary: the twin-class mean (coniferous, deciduous, "
        "herbaceous, agricultural, bare soil, plowed), mIoU 12, accuracy, and mIoU 13 on the validation "
        "split (where runs have one).",
        "",
        "| row | baseline | seeds | " + " | ".join(f"{label} diff | p" for _, label in METRICS) + " |",
        "|---|---|---|" + "---|---|" * len(METRICS),
    ]
    for per_metric in results:
        first = per_metric[0]
        cells = []
        for result in per_metric:
            shown = "-" if math.isnan(result.mean) else f"{result.mean:+.2f}"
            if not math.isnan(result.sd):
                shown += f" ± {result.sd:.2f}"
            cells += [shown, format_p(result.p_value)]
        won = f"{first.wins}/{len(first.seeds)}"
        lines.append(f"| {first.row} | {first.baseline} | {won} | " + " | ".join(cells) + " |")
    return lines


def _csv(header: list[str], records: list[list[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for record in records:
        writer.writerow(
            [
                "" if isinstance(v, float) and math.isnan(v) else (f"{v:.4f}" if isinstance(v, float) else v)
                for v in record
            ]
        )
    return buffer.getvalue().encode()


def write_tables(study: Study, rows: list[EntryRow]) -> list[Path]:
    """results.md, results.csv (per configuration) and runs.csv (per run), atomically."""
    names = [cls.name.replace(" ", "_") for cls in FLAIR_CLASSES]
    header = ["configuration", "model", "inputs", "training", "seeds_finished", "seeds"]
    for metric in ("miou13", "miou12", "accuracy"):
        header += [f"{metric}_mean", f"{metric}_std"]
    header += [f"iou_{name}" for name in names]
    per_entry = [
        [row.name, row.model, row.inputs, row.training, len(row.runs), row.expected,
         *row.miou, *row.miou_without_other, *row.accuracy, *row.class_iou()]
        for row in rows
    ]  # fmt: skip
    per_run = [
        [row.name, score.run.seed, 100 * score.miou, 100 * score.miou_without_other, 100 * score.accuracy,
         *(100 * v for v in score.iou), 100 * score.val_miou, str(score.run.output_dir)]
        for row in rows
        for score in row.runs
    ]  # fmt: skip
    run_header = [
        "configuration",
        "seed",
        "miou13",
        "miou12",
        "accuracy",
        *[f"iou_{n}" for n in names],
        "val_miou13",
        "run_dir",
    ]
    out = study.output_dir
    written = [out / RESULTS_MD, out / RESULTS_CSV, out / RUNS_CSV]
    atomic_write_bytes(written[0], markdown(study, rows).encode())
    atomic_write_bytes(written[1], _csv(header, per_entry))
    atomic_write_bytes(written[2], _csv(run_header, per_run))
    if study.comparisons:
        records = [
            [r.row, r.baseline, r.metric, len(r.seeds), " ".join(map(str, r.seeds)), r.mean, r.sd, r.wins,
             r.p_value]
            for per_metric in paired_results(study, rows)
            for r in per_metric
        ]  # fmt: skip
        header = ["row", "baseline", "metric", "seeds_paired", "seeds"]
        header += ["mean_diff", "sd_diff", "wins", "p_value"]
        atomic_write_bytes(out / COMPARISONS_CSV, _csv(header, records))
        written.append(out / COMPARISONS_CSV)
    return written
