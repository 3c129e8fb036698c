"""``damformer study``: train a study's grid (locally, or plan it for Slurm), then collect its results.

    damformer study configs/studies/miniature.yaml --jobs 2      # train what is not finished, collect
    damformer study configs/studies/paper.yaml --dry-run         # the commands, for another scheduler
    damformer study configs/studies/paper.yaml --collect         # tables, figure, MLflow artifacts only
    bash slurm/study.sh configs/studies/paper.yaml               # a Slurm job array + a collecting job

Tracking: one MLflow parent run per study (experiment = the study's name) with every training nested
under it (tags model, inputs, seed); the tables and the figure are the parent's artifacts. The default
store is the study's own ``sqlite:///OUTPUT/mlflow.db`` (artifacts in ``OUTPUT/mlartifacts``); a shared
server is ``--tracking-uri http://HOST:PORT`` (use a server on a cluster: many nodes writing one SQLite
file over a network file system is not safe).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from damformer.errors import EXIT_STOPPED
from damformer.study.results import collect_rows, markdown, write_tables
from damformer.study.runner import dry_run_lines, run_local, write_task_file
from damformer.study.spec import Study, StudyRun, load_study
from damformer.study.state import FAILED, FINISHED, StudyState, refuse_changed, status
from damformer.tracking.mlflow_tracker import Tracker

log = logging.getLogger(__name__)

ARTIFACT_ROOT = "mlartifacts"
STORE = "mlflow.db"


@dataclass
class StudyReport:
    """What a study invocation did and found."""

    statuses: dict[str, str]
    table: str
    written: list[Path]
    stopped: bool = False

    @property
    def complete(self) -> bool:
        """Whether every run of the study is finished."""
        return all(value == FINISHED for value in self.statuses.values())

    def unfinished(self) -> list[str]:
        """``NAME/seed-S: status`` of every run that is not finished."""
        return [f"{key}: {value}" for key, value in self.statuses.items() if value != FINISHED]


def tracking_uri(study: Study, override: str | None) -> str:
    """The store of the study: ``--tracking-uri``, the file's ``tracking_uri``, or OUTPUT/mlflow.db."""
    return override or study.tracking_uri or f"sqlite:///{(study.output_dir / STORE).resolve()}"


def parent_tracker(study: Study, state: StudyState, uri: str) -> Tracker:
    """Open (or continue) the study's parent run; tracking off gives a tracker that logs nothing."""
    if not study.tracking:
        return Tracker.off()
    local = "://" not in uri or uri.startswith(("sqlite:", "file:"))
    tracker = Tracker(
        uri,
        study.name,
        f"study {study.name}",
        artifact_root=study.output_dir / ARTIFACT_ROOT if local else None,
        run_id=state.parent_run_id,
        tags={"damformer.study": study.name, "study_file": str(study.path)},
    )
    if tracker.run_id and tracker.run_id != state.parent_run_id:
        state.parent_run_id = tracker.run_id
        tracker.log_params(
            {
                "study.seeds": ",".join(map(str, study.seeds)),
                "study.configs": ",".join(entry.name for entry in study.entries),
                "study.set": " ".join(study.overrides + study.extra_overrides)[:6000] or "-",
            }
        )
    return tracker


def pending_runs(study: Study, state: StudyState) -> list[StudyRun]:
    """The runs that are not finished, in the study's order."""
    return [run for run in study.runs if status(study, run, state) != FINISHED]


def plan(
    study: Study, *, uri_override: str | None, dry_run: bool, retrain_changed: bool = False
) -> list[str] | Path:
    """Without training: the shell lines (``dry_run``) or a Slurm task file for the unfinished runs."""
    if not dry_run:
        refuse_changed(study, retrain=retrain_changed)
    state = StudyState(study)  # read only here: it writes when a parent run or an attempt is recorded
    uri = tracking_uri(study, uri_override)
    runs = pending_runs(study, state)
    if dry_run:
        return dry_run_lines(study, runs, parent_run_id=state.parent_run_id, tracking_uri=uri)
    tracker = parent_tracker(study, state, uri)
    return write_task_file(study, runs, parent_run_id=tracker.run_id, tracking_uri=uri)


def run(study: Study, *, jobs: int, uri_override: str | None, retrain_changed: bool = False) -> StudyReport:
    """Train every unfinished run here (``jobs`` at a time), then collect."""
    refuse_changed(study, retrain=retrain_changed)
    state = StudyState(study)
    uri = tracking_uri(study, uri_override)
    tracker = parent_tracker(study, state, uri)
    _, stopped = run_local(study, state, jobs=jobs, parent_run_id=tracker.run_id, tracking_uri=uri)
    report = collect(study, uri_override=uri_override, tracker=tracker, state=state)
    report.stopped = stopped
    return report


def collect(
    study: Study, *, uri_override: str | None, tracker: Tracker | None = None, state: StudyState | None = None
) -> StudyReport:
    """Tables (Markdown, CSV), the figure, and the parent run's artifacts, from the run folders."""
    from damformer.study.figure import write_figure

    state = state or StudyState(study)
    tracker = tracker or parent_tracker(study, state, tracking_uri(study, uri_override))
    statuses = {run.key: status(study, run, state) for run in study.runs}
    rows = collect_rows(study, statuses)
    written = write_tables(study, rows)
    finished = [row for row in rows if row.runs]
    if finished:  # the target test set of a configuration that trained (another may name a bad one)
        config = study.resolved_config(finished[0].runs[0].run)
        figure = write_figure(study, rows, config.data.target_test, config.data.target_domains)
        written += [
            figure,
            *(p for p in (figure.with_suffix(".pdf"), figure.with_suffix(".svg")) if p.is_file()),
        ]
    for path in written:
        tracker.log_artifact(path)
    tracker.log_metrics(
        {f"mIoU mean/{row.name}": row.miou[0] for row in rows if row.runs}
        | {f"mIoU without other mean/{row.name}": row.miou_without_other[0] for row in rows if row.runs},
        step=0,
    )
    report = StudyReport(statuses, markdown(study, rows), written)
    if report.complete:
        tracker.finish("FINISHED")
    else:
        tracker.set_tags({"damformer.unfinished": ", ".join(report.unfinished())[:5000]})
        tracker.finish("FAILED" if FAILED in statuses.values() else "KILLED")
    return report


def study_command(args: argparse.Namespace) -> int:
    """``damformer study``: plan (``--dry-run``, ``--slurm-tasks``), collect, or run, then the table."""
    study = load_study(args.study, overrides=args.set, output_dir=args.output_dir)
    if args.dry_run or args.slurm_tasks:
        planned = plan(
            study, uri_override=args.tracking_uri, dry_run=args.dry_run, retrain_changed=args.retrain_changed
        )
        if isinstance(planned, Path):  # slurm/study.sh reads "COUNT PATH" from this line
            count = len(json.loads(planned.read_text())["tasks"])
            print(f"{count} {planned}")
        else:
            print("\n".join(planned))
        return 0
    if args.collect:
        report = collect(study, uri_override=args.tracking_uri)
    else:
        report = run(
            study, jobs=args.jobs, uri_override=args.tracking_uri, retrain_changed=args.retrain_changed
        )
    print(report.table)
    print(f"written: {', '.join(str(path) for path in report.written)}")
    if report.stopped:
        print(f"stopped on request; {len(report.unfinished())} run(s) left: run the same command to continue")
        return EXIT_STOPPED
    if not report.complete:
        print("not finished: " + "; ".join(report.unfinished()), file=sys.stderr)
        print(
            f"(logs: {study.output_dir}/runs/NAME/seed-S/train.log; the same command retries them)",
            file=sys.stderr,
        )
        return 1
    return 0
