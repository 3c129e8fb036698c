"""Paired comparisons of a study: the sign-flip p-value by hand, the study table and CSV, bad keys."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from damformer.study.paired import TWIN_CLASSES, sign_flip_p_value
from damformer.study.results import EntryRow, RunScores, markdown, write_tables
from damformer.study.spec import StudyError, StudyRun, load_study

CONFIG = Path(__file__).parents[2] / "configs" / "demo" / "damformer.yaml"

# A fixed runs table: mIoU 13 in percent per seed. damformer - uda: +8, -1, +2, +4 on seeds 0..3
# (seed 4 only in uda: not paired).
MIOU = {
    "uda": {0: 30.0, 1: 25.0, 2: 20.0, 3: 26.0, 4: 22.0},
    "damformer": {0: 38.0, 1: 24.0, 2: 22.0, 3: 30.0},
    "source-only": {0: 20.0, 1: 20.0, 2: 20.0, 3: 20.0},
}


def test_sign_flip_p_value_equals_the_hand_count():
    # d = (1, 2, 3): mean 2; of the 8 sign patterns only +++ and --- reach |mean| >= 2.
    assert sign_flip_p_value([1, 2, 3]) == pytest.approx(2 / 8)
    # d = (8, -1, 2, 4), |d| summing to 15, observed sum 13: a pattern reaches |sum| >= 13 only when the
    # signs against the majority carry at most 1 of magnitude: none flipped, or only the 1: 2 x 2 of 16.
    assert sign_flip_p_value([8, -1, 2, 4]) == pytest.approx(4 / 16)
    # Eight differences of one sign: only the two constant patterns reach it: 2 / 256.
    assert sign_flip_p_value([1.5] * 8) == pytest.approx(2 / 256)
    # Three seeds can never go below 0.25: the limit the issue quotes.
    assert min(sign_flip_p_value([a, b, c]) for a in (1, 5) for b in (2, 7) for c in (3, 11)) == 0.25
    assert sign_flip_p_value([0.0, 0.0]) == 1.0
    assert math.isnan(sign_flip_p_value([]))


def _study(tmp_path: Path, compare: str) -> object:
    lines = [
        "name: paired",
        f"output_dir: {tmp_path / 'out'}",
        "seeds: [0, 1, 2, 3, 4]",
        "configs:",
        *[f"  - {{name: {name}, config: {CONFIG}}}" for name in MIOU],
        compare,
    ]
    (tmp_path / "study.yaml").write_text("\n".join(lines) + "\n")
    return load_study(tmp_path / "study.yaml")


def _rows(study) -> list[EntryRow]:
    rows = []
    for entry in study.entries:
        row = EntryRow(entry.name, "m", "i", "UDA", expected=5)
        for seed, miou in MIOU[entry.name].items():
            iou = [0.5] * 13
            for cls in TWIN_CLASSES:
                iou[cls] = miou / 100  # the twin mean follows the primary metric here
            run = StudyRun(entry, seed, study.output_dir / entry.name / str(seed))
            row.runs.append(RunScores(run, miou / 100, miou / 100, 0.5, iou))
        rows.append(row)
    return rows


def test_the_study_table_holds_the_hand_computed_paired_comparison(tmp_path):
    study = _study(tmp_path, "compare: {baseline: uda, pairs: [[damformer, source-only]]}")
    assert study.comparisons == [("damformer", "uda"), ("source-only", "uda"), ("damformer", "source-only")]
    rows = _rows(study)
    written = write_tables(study, rows)
    assert written[-1].name == "comparisons.csv"
    with written[-1].open() as handle:
        records = {(r["row"], r["baseline"], r["metric"]): r for r in csv.DictReader(handle)}
    primary = records[("damformer", "uda", "miou13")]
    # d = (8, -1, 2, 4): mean 3.25, sd of the four, p 4/16 (test above), seed 4 left out, 3 wins of 4.
    assert primary["seeds"] == "0 1 2 3" and primary["wins"] == "3"
    assert float(primary["mean_diff"]) == pytest.approx(3.25)
    assert float(primary["sd_diff"]) == pytest.approx(3.774917, abs=1e-4)  # sqrt(42.75 / 3)
    assert float(primary["p_value"]) == pytest.approx(0.25)
    assert float(records[("damformer", "uda", "twin6")]["mean_diff"]) == pytest.approx(3.25)
    assert float(records[("damformer", "uda", "accuracy")]["mean_diff"]) == 0.0
    # source-only - uda: -10, -5, 0, -6: p = 4/16 (|sum| >= 21 of 21: none flipped, or only the zero).
    assert float(records[("source-only", "uda", "miou13")]["p_value"]) == pytest.approx(4 / 16)
    table = markdown(study, rows)
    assert "| damformer | uda | 3/4 | +3.25 ± 3.77 | 0.250 |" in table


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ("compare: {baseline: nope}", "'nope' is not a row of the study"),
        ("compare: {pairs: [[uda, uda]]}", "'uda' compared with itself"),
        ("compare: {pairs: [uda]}", r"compare.pairs: expected a list of \[row, baseline\] pairs"),
        ("compare: {against: uda}", "compare: expected a mapping with baseline and/or pairs"),
    ],
)
def test_bad_compare_keys_are_one_line_naming_the_study(tmp_path, compare, message):
    with pytest.raises(StudyError, match=message):
        _study(tmp_path, compare)
