"""damformer study: the miniature study end to end, resumability, dry runs and bad study files.

The miniature study file itself (configs/studies/miniature.yaml) runs here, on the tests' tiny shards
and with tiny iteration counts (command-line --set), through the real `damformer` command.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from damformer.cli import main
from damformer.runtime.artifacts import load_checkpoint
from damformer.study.figure import figure_size
from damformer.study.spec import StudyError, load_study

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).parents[2]
MINIATURE = ROOT / "configs" / "studies" / "miniature.yaml"


def _study_command(study: Path, out: Path, sets: list[str], *extra: str) -> list[str]:
    command = [sys.executable, "-m", "damformer", "-q", "study", str(study), "--output-dir", str(out), *extra]
    for assignment in sets:
        command += ["--set", assignment]
    return command


def _evaluate(checkpoint: Path, shards: Path, capsys) -> tuple[float, float]:
    """mIoU over 13 and 12 classes as `damformer evaluate` prints them."""
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards)]) == 0
    printed = capsys.readouterr().out
    miou13 = float(re.search(r"mIoU \(13 classes\)\s+([\d.]+)", printed).group(1))
    miou12 = float(re.search(r"mIoU \(12, no other\)\s+([\d.]+)", printed).group(1))
    return miou13, miou12


def test_the_miniature_study_end_to_end(study_sets, tiny_shards, tmp_path, capsys):
    out = tmp_path / "study"
    result = subprocess.run(
        _study_command(MINIATURE, out, study_sets(), "--jobs", "2"),
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(MINIATURE, output_dir=out)
    assert len(study.entries) == 4 and study.seeds == [0, 1]
    for run in study.runs:  # every run finished its schedule
        assert load_checkpoint(run.output_dir / "checkpoint.pt")["iteration"] == 3, run.key

    # One row per configuration, with mean and std over the two seeds.
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["configuration"] for row in rows] == [entry.name for entry in study.entries]
    for row in rows:
        assert row["seeds_finished"] == "2" and row["miou13_mean"] and row["miou13_std"], row
        assert row["miou12_mean"] and row["accuracy_mean"], row
        assert any(value for key, value in row.items() if key.startswith("iou_")), row  # classes present
    markdown = (out / "results.md").read_text()
    assert "| damformer-rgbne-t | DAM-Former | RGB+NIR+E+T | UDA | 2/2 |" in markdown
    assert " ± " in markdown and markdown in result.stdout

    # Per run, the table's 13- and 12-class mIoU are what `damformer evaluate` prints for its checkpoint.
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 8
    for row in runs:
        miou13, miou12 = _evaluate(Path(row["run_dir"]) / "checkpoint.pt", tiny_shards["north-test"], capsys)
        assert float(row["miou13"]) == pytest.approx(miou13, abs=0.006), row["run_dir"]
        assert float(row["miou12"]) == pytest.approx(miou12, abs=0.006), row["run_dir"]
    mean = sum(float(r["miou13"]) for r in runs if r["configuration"] == rows[0]["configuration"]) / 2
    assert float(rows[0]["miou13_mean"]) == pytest.approx(mean, abs=1e-3)

    # The figure: GT, RGB, NIR, elevation and the 4 configurations' predictions.
    with Image.open(out / "figure.png") as image:
        assert image.size == figure_size(4 + 4)
    assert (out / "figure.pdf").read_bytes()[:5] == b"%PDF-" and b"<svg" in (out / "figure.svg").read_bytes()[
        :400
    ]

    # MLflow: one parent run holding the study's artifacts, the 8 trainings nested under it.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("miniature")
    everything = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and parent.info.status == "FINISHED"
    networks = (("U-Net (C)", "RGB+NIR+E"), ("DAFormer", "RGB+NIR+E"), ("U-Net (T)", "RGB+NIR+E"))
    networks += (("DAM-Former", "RGB+NIR+E+T"),)
    tagged = {(c.data.tags["model"], c.data.tags["inputs"], c.data.tags["seed"]) for c in children}
    assert tagged == {(f"{name} {inputs}", inputs, seed) for name, inputs in networks for seed in ("0", "1")}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "runs.csv", "figure.png", "figure.pdf", "figure.svg"} <= artifacts
    assert parent.data.metrics[f"mIoU mean/{rows[0]['configuration']}"] == pytest.approx(
        float(rows[0]["miou13_mean"]), abs=1e-3
    )


UNET_T = ROOT / "configs" / "ablation" / "unet_t-rgbne.yaml"


def test_a_killed_study_reruns_without_training_a_run_twice(study_sets, study_file, tmp_path):
    iterations = 20
    # The first run is short (it only has to finish before the kill); the second is long enough to be
    # stopped mid-run. The iteration counts sit in the study file: the command line's --set would win.
    first_entry = f"{{name: first, config: {UNET_T}, set: {{optim.max_iters: 3}}}}"
    entries = [first_entry, f"{{name: second, config: {UNET_T}}}"]
    study = study_file(tmp_path / "killed", entries, extra_set={"optim.max_iters": iterations})
    out = tmp_path / "out"
    sets = study_sets(**{"optim.max_iters": None, "log.tracking": False})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(_study_command(study, out, sets), stderr=subprocess.PIPE, text=True, env=env)
    first, second = out / "runs" / "first" / "seed-0", out / "runs" / "second" / "seed-0"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (first / "scores.json").is_file() and (second / "checkpoint.pt").is_file():
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-2000:]  # stopped on request: run it again
    stopped_at = load_checkpoint(second / "checkpoint.pt")["iteration"]
    assert 0 < stopped_at < iterations
    finished_first = (first / "checkpoint.pt").stat().st_mtime_ns

    again = subprocess.run(_study_command(study, out, sets), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (first / "checkpoint.pt").stat().st_mtime_ns == finished_first  # not trained again
    assert (first / "train.log").read_text().count("\n=== ") == 1
    log = (second / "train.log").read_text()
    assert (
        log.count("\n=== ") == 2
        and f"resumed from {second / 'checkpoint.pt'} at iteration {stopped_at}" in log
    )
    assert len(load_checkpoint(second / "checkpoint.pt")["history"]) == iterations
    assert load_checkpoint(first / "checkpoint.pt")["iteration"] == 3
    record = json.loads((out / "study.json").read_text())["runs"]["second/seed-0"]
    assert record["attempts"] == 2 and record["status"] == "finished"


def test_a_failed_run_does_not_stop_the_others_and_is_reported(study_sets, study_file, tiny_shards, tmp_path):
    nowhere = tmp_path / "nowhere"
    study = study_file(
        tmp_path / "failing",
        [
            f"{{name: broken, config: {UNET_T}, set: {{data.target_test: [{nowhere}]}}}}",
            f"{{name: fine, config: {UNET_T}}}",
        ],
        extra_set={"data.target_test": [str(tiny_shards["north-test"])]},
    )
    out = tmp_path / "out"
    sets = [s for s in study_sets(**{"log.tracking": False}) if not s.startswith("data.target_test=")]
    result = subprocess.run(_study_command(study, out, sets), capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    unfinished = result.stderr.split("not finished:")[1].splitlines()[0]
    assert "broken/seed-0: failed" in unfinished and "fine" not in unfinished
    assert (out / "runs" / "fine" / "seed-0" / "scores.json").is_file()
    assert str(nowhere) in (out / "runs" / "broken" / "seed-0" / "train.log").read_text()
    assert "| broken | U-Net (T) | RGB+NIR+E | UDA | 0/1 |" in (out / "results.md").read_text()


def test_dry_run_prints_the_commands_and_runs_nothing(study_sets, tmp_path, capsys):
    out = tmp_path / "dry"
    args = ["-q", "study", str(MINIATURE), "--dry-run", "--output-dir", str(out)]
    for assignment in study_sets():
        args += ["--set", assignment]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summaries = [line for line in printed if line.startswith("# ")]  # what each entry trains, resolved
    assert len(summaries) == 4 and summaries[0].startswith("# unet_c-rgbne: U-Net (C) RGB+NIR+E, CNN encoder")
    assert all("global batch 4 + 4, 3 iterations" in line for line in summaries), summaries
    lines = [line for line in printed if not line.startswith("# ")]
    assert len(lines) == 8 + 1  # 4 configs x 2 seeds, then the collecting command
    assert all(line.startswith("damformer train configs/ablation/") for line in lines[:8])
    assert "--auto-resume" in lines[0] and "run.seed=1" in lines[1] and "log.experiment=miniature" in lines[0]
    assert lines[-1].startswith(f"damformer study {MINIATURE} --collect")
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("configs: [nowhere/*.yaml]\n", "matches no file"),
        ("configs: [configs/ablation/unet_t-rgb.yaml]\nseed: [0]\n", "unknown key(s) seed"),
        ("configs: [configs/ablation/unet_t-rgb.yaml]\nseeds: [0, 0]\n", "seeds: repeated"),
        (
            "configs: [configs/ablation/unet_t-rgb.yaml, configs/ablation/unet_t-rgb.yaml]\n",
            "repeated: unet_t-rgb",
        ),
        ("configs: [{name: x}]\n", "config required"),
        ("configs: [\n", "not valid YAML"),
    ],
)
def test_bad_study_files_are_one_clear_error(text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(path)
    assert main(["study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"damformer study: error: {path}") and len(err.strip().splitlines()) == 1
