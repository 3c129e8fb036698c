"""A real single-node Slurm (Debian's slurmctld + slurmd + munge) for tests, started and stopped here.

Needs root: the daemons run as root (infra.md), and where Slurm is missing it is installed with apt.
Without root, or where the packages cannot be installed, :func:`start` returns the reason to skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _install() -> str | None:
    """Install the Debian packages when missing; the reason it cannot, or None."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed, and installing and running it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        if result.returncode != 0:
            return f"could not install Slurm ({' '.join(command)}): {result.stderr.strip()[-300:]}"
    return None


@dataclass
class SlurmCluster:
    """A running one-node cluster; pass :attr:`env` to sbatch/scontrol."""

    folder: Path
    env: dict[str, str]
    started_munge: int | None

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        result = self.run("scontrol", "show", "job", "-o", job_id)
        if result.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {result.stderr}")
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def signal_batch_once(self, job_id: str, batch_log: Path, delivered: str, timeout: float = 60) -> bool:
        """``scancel --signal=USR1 --batch JOB``, delivered exactly once: True once ``batch_log`` shows it.

        Under load slurmctld can deliver the signal and still answer "Job can not be altered now, try
        again later"; scancel then retries every few seconds and, once the job has requeued itself,
        signals the new attempt too. So scancel is stopped as soon as the batch shell has said
        ``delivered`` (the trap's message).
        """
        command = ["scancel", "--signal=USR1", "--batch", job_id]
        sender = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if batch_log.is_file() and delivered in batch_log.read_text():
                    return True
                time.sleep(0.1)
            return False
        finally:
            sender.kill()
            sender.wait()

    def wait_for(self, job_id: str, predicate, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if predicate(job) or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        if self.started_munge is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.started_munge, signal.SIGTERM)
        time.sleep(1)


def _config(folder: Path, host: str, cpus: int) -> str:
    return "\n".join(
        [
            "ClusterName=damformer-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            # A requeued job waits out the revoked credential of its last run (default 120 s); releasing
            # it sooner by hand makes slurmd refuse it ("Job credential revoked").
            "AuthInfo=cred_expire=10",
            "CredType=cred/munge",
            # A pending job (a requeued one, the collecting job) waits for the next scheduling pass:
            # every 60 s (main loop) or 30 s (backfill) by default, most of a short test's time.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ReturnToService=2",
            "MinJobAge=600",  # finished jobs stay visible to scontrol (there is no accounting database)
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _munge_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True, check=False).returncode == 0


def start(folder: Path, env: dict[str, str]) -> SlurmCluster | str:
    """Start munge (unless running), slurmctld and slurmd; the cluster, or the reason it cannot run."""
    reason = _install()
    if reason is not None:
        return reason
    if os.geteuid() != 0:
        return "running slurmctld and slurmd needs root"
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host, os.cpu_count() or 1))
    started_munge = None
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
        pid = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True, check=False)
        started_munge = int(pid.stdout.split()[0]) if pid.stdout.strip() else None
    cluster = SlurmCluster(folder, dict(env, SLURM_CONF=str(conf)), started_munge)
    for daemon in ("slurmctld", "slurmd"):
        result = cluster.run(daemon, "-f", str(conf))
        if result.returncode != 0:
            cluster.stop()
            return f"{daemon} did not start: {result.stderr.strip()[-300:]}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T").stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    cluster.stop()
    log = (folder / "slurmctld.log").read_text()[-1000:] if (folder / "slurmctld.log").is_file() else ""
    return f"the Slurm node did not become idle in 30 s (state {state!r}); slurmctld log: {log}"
