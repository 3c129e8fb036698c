"""Launch the trainings of a study: on this machine (N at a time), as printed commands, or as Slurm tasks.

Every training is the ordinary ``damformer train CONFIG --auto-resume --set ...`` in its own process
and folder, so a study adds no training code path: what a study runs, a user can run by hand.

Locally, a failed training never stops the others; its log is kept and the next invocation retries it
from its last checkpoint. SIGINT/SIGTERM to the study ask every running training to checkpoint and stop
(exit 75: run the study again to continue), and no new one starts. If the study process itself is
killed, its trainings get SIGTERM from the kernel (PR_SET_PDEATHSIG) and checkpoint in the same way.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from damformer.atomic import atomic_write_bytes
from damformer.errors import EXIT_STOPPED  # a training stopped on request, checkpointed
from damformer.progress import progress
from damformer.study.spec import Study, StudyError, StudyRun
from damformer.study.state import FAILED, FINISHED, INTERRUPTED, StudyState, status

log = logging.getLogger(__name__)

LOG_NAME = "train.log"


def train_arguments(
    study: Study, run: StudyRun, *, parent_run_id: str | None, tracking_uri: str | None
) -> list[str]:
    """``damformer train`` arguments of one run (after ``train``): config, resume, every override."""
    sets = study.run_overrides(run)
    if study.tracking:
        sets += [
            f"log.experiment={study.name}",
            f"log.run_name={json.dumps(f'{run.entry.name} seed {run.seed}')}",
        ]
        if tracking_uri:
            sets.append(f"log.tracking_uri={tracking_uri}")
        if parent_run_id:
            sets.append(f"log.parent_run_id={parent_run_id}")
    else:
        sets.append("log.tracking=false")
    return [str(run.entry.config), "--auto-resume", *[part for item in sets for part in ("--set", item)]]


def dry_run_lines(
    study: Study, runs: list[StudyRun], *, parent_run_id: str | None, tracking_uri: str | None
) -> list[str]:
    """A comment per entry (what it trains, resolved), a shell line per run, then the collecting command."""
    lines = [entry_summary(study, entry_runs[0]) for entry_runs in _by_entry(runs)]
    lines += [
        shlex.join(
            [
                "damformer",
                "train",
                *train_arguments(study, run, parent_run_id=parent_run_id, tracking_uri=tracking_uri),
            ]
        )
        for run in runs
    ]
    lines.append(
        shlex.join(
            ["damformer", "study", str(study.path), "--collect", "--output-dir", str(study.output_dir)]
        )
    )
    return lines


def _by_entry(runs: list[StudyRun]) -> list[list[StudyRun]]:
    groups: dict[str, list[StudyRun]] = {}
    for run in runs:
        groups.setdefault(run.entry.name, []).append(run)
    return list(groups.values())


def entry_summary(study: Study, run: StudyRun) -> str:
    """``# NAME: model, fusion, training, batch`` as the entry's config resolves (a shell comment)."""
    from damformer.config.batch import plan_batch

    config = study.resolved_config(run, check_files=False)
    model, uda = config.model, config.uda
    parts = [model.name, model.mit_size if model.arch != "unet_c" else "CNN encoder"]
    if model.temporal:
        parts.append(f"DTF levels {model.fusion_levels} (zero-init {str(model.fusion_zero_init).lower()})")
    parts.append("UDA" if uda.enabled else "source only")
    if uda.enabled and model.temporal:
        parts.append(f"ML {uda.lr_weight:g}, EP {uda.ensemble_lr_weight:g}")
    batch = plan_batch(
        global_batch=config.data.global_batch, batch_size=config.data.batch_size,
        grad_accum=config.optim.grad_accum, world_size=1,
    )  # fmt: skip
    stated = "" if batch.stated else " per process (data.global_batch not set)"
    parts.append(f"global batch {batch.global_batch} + {batch.global_batch}{stated}")
    parts.append(f"{config.optim.max_iters} iterations")
    return f"# {run.entry.name}: " + ", ".join(parts)


def write_task_file(
    study: Study, runs: list[StudyRun], *, parent_run_id: str | None, tracking_uri: str | None
) -> Path:
    """Freeze the runs of one Slurm submission: array task i runs the i-th argument list.

    A new file per submission (named by time), so a requeued task of an older array still finds its own.
    """
    folder = study.output_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    tasks = [
        {
            "run": run.key,
            "args": train_arguments(study, run, parent_run_id=parent_run_id, tracking_uri=tracking_uri),
        }
        for run in runs
    ]
    atomic_write_bytes(path, json.dumps({"study": str(study.path), "tasks": tasks}, indent=1).encode())
    return path


def task_arguments(task_file: Path, index: int) -> list[str]:
    """The ``damformer train`` arguments of array task ``index`` (for slurm/train.sh --study-task)."""
    try:
        tasks = json.loads(Path(task_file).read_text())["tasks"]
    except (OSError, ValueError, KeyError) as exc:
        raise StudyError(f"{task_file}: not a study task file ({type(exc).__name__}: {exc})") from None
    if not 0 <= index < len(tasks):
        raise StudyError(
            f"{task_file}: array task {index} is out of range (the file holds {len(tasks)} tasks)"
        )
    return tasks[index]["args"]


@dataclass
class Outcome:
    """How one launched training ended."""

    run: StudyRun
    status: str  # finished, interrupted, failed
    exit_code: int
    seconds: float


def _die_with_parent() -> None:
    """In the child: SIGTERM when the study process dies (Linux), so a killed study leaves no orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C still reaches the whole process group


class _StopRequests:
    """SIGINT/SIGTERM to the study: no new training starts, running ones get SIGTERM and checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.children: list[subprocess.Popen] = []
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if not self.requested:
            log.warning(
                "%s: every running training checkpoints and stops; run the study again to continue",
                signal.Signals(number).name,
            )
        self.requested = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def __enter__(self) -> _StopRequests:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]


def _child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # share the cores: N trainings of cores / N threads each
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_local(
    study: Study,
    state: StudyState,
    *,
    jobs: int = 1,
    parent_run_id: str | None,
    tracking_uri: str | None,
) -> tuple[list[Outcome], bool]:
    """Train every unfinished run, ``jobs`` at a time. Returns the outcomes and whether a stop was asked."""
    if jobs < 1:
        raise StudyError(f"--jobs {jobs}: expected >= 1")
    # Seed by seed (every row's lowest seed, then the next...): a study stopped half-way holds complete
    # pairs of rows to compare, not some rows with every seed and others with none.
    runs = sorted(enumerate(study.runs), key=lambda item: (item[1].seed, item[0]))
    todo = [run for _, run in runs if status(study, run, state) != FINISHED]
    done = len(study.runs) - len(todo)
    if done:
        log.info("%d of %d runs already finished: skipped", done, len(study.runs))
    outcomes: list[Outcome] = []
    with _StopRequests() as stop:
        events = _launch(
            study, state, todo, jobs=jobs, stop=stop, parent_run_id=parent_run_id, tracking_uri=tracking_uri
        )
        for outcome in progress(events, desc=f"study {study.name}", unit="run", total=len(todo)):
            outcomes.append(outcome)
            where = outcome.run.output_dir / LOG_NAME
            message = f"{outcome.run.key}: {outcome.status} after {outcome.seconds:.0f} s"
            if outcome.status == FAILED:
                log.error("%s (exit %d); its log: %s", message, outcome.exit_code, where)
            else:
                log.info(message)
        return outcomes, stop.requested


def _launch(
    study: Study,
    state: StudyState,
    todo: list[StudyRun],
    *,
    jobs: int,
    stop: _StopRequests,
    parent_run_id: str | None,
    tracking_uri: str | None,
) -> Iterator[Outcome]:
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[StudyRun, float]] = {}
    env = _child_env(jobs)
    while pending or running:
        while pending and len(running) < jobs and not stop.requested:
            run = pending.pop(0)
            run.output_dir.mkdir(parents=True, exist_ok=True)
            arguments = train_arguments(study, run, parent_run_id=parent_run_id, tracking_uri=tracking_uri)
            # the default output: resumes, scores and a progress line every 30 s in the run's log
            command = [sys.executable, "-m", "damformer", "train", *arguments]
            with (run.output_dir / LOG_NAME).open("ab") as log_file:
                log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
                log_file.flush()
                child = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
                )
            stop.children.append(child)
            attempts = state.attempt(run).get("attempts", 0) + 1
            state.record(run, status="running", attempts=attempts, log=str(run.output_dir / LOG_NAME))
            running[child] = (run, time.monotonic())
        if stop.requested and not running:
            return
        time.sleep(0.2)
        for child in [c for c in running if c.poll() is not None]:
            run, started = running.pop(child)
            stop.children.remove(child)
            code = child.returncode
            if code == 0 and status(study, run, state) == FINISHED:
                result = FINISHED
            elif code == EXIT_STOPPED or (stop.requested and code in (-signal.SIGTERM, -signal.SIGINT)):
                result = INTERRUPTED
            else:
                result = FAILED
            state.record(run, status=result, exit_code=code)
            yield Outcome(run, result, code, time.monotonic() - started)
