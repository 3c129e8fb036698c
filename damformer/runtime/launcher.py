"""``damformer launch``: one node, N worker processes, every socket on the loopback.

    damformer launch --nproc 4 -- train configs/ablation/damformer-rgbne-t.yaml --auto-resume
    launch/torchrun.sh CONFIG                     # the same, one process per visible GPU

The workers get what torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so ``damformer train`` cannot tell the difference. What differs is the network:
torchrun's agent and its rendezvous store listen on every interface, whatever the endpoint says, and
a single-node job has no reason to be reachable from the network. Here the store's socket is bound to
127.0.0.1 by this launcher and handed to rank 0 (``DAMFORMER_STORE_FD``), and the collectives' own
sockets stay on the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME=lo``).

A failing worker (non-zero exit other than 75, or a signal) stops the others; the job then starts
again from its last checkpoint up to ``--max-restarts`` times (train with ``--auto-resume``), each
attempt with a fresh store. SIGINT, SIGTERM and SIGUSR1 are passed on to every worker once: each
checkpoints and stops (exit 75, passed on). Multi-node jobs use torchrun (launch/multinode.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from damformer.errors import EXIT_STOPPED

STORE_FD_VARIABLE = "DAMFORMER_STORE_FD"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _die_with_parent() -> None:
    """In each worker: SIGTERM when the launcher dies (Linux), so no worker is left orphaned."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the launcher's signals still reach them
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Signals:
    """Pass the launcher's SIGINT/SIGTERM/SIGUSR1 on to the workers, once each."""

    def __init__(self) -> None:
        self.workers: list[subprocess.Popen] = []
        self.received: int | None = None

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        self.received = number
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(number)

    def __enter__(self) -> _Signals:
        self._previous = {number: signal.signal(number, self._handle) for number in FORWARDED}
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _attempt(arguments: Sequence[str], nproc: int, attempt: int, signals: _Signals) -> int:
    """Run one attempt of the job; the first failing worker's exit code (0 when all succeed)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    base = dict(os.environ)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base.setdefault("NCCL_SOCKET_IFNAME", "lo")
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc))
    base.update(LOCAL_WORLD_SIZE=str(nproc), DAMFORMER_LAUNCH_ATTEMPT=str(attempt))
    signals.workers = []
    try:
        for rank in range(nproc):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            pass_fds: tuple[int, ...] = ()
            if rank == 0:
                env[STORE_FD_VARIABLE] = str(listener.fileno())
                pass_fds = (listener.fileno(),)
            worker = subprocess.Popen(
                [sys.executable, "-m", "damformer", *arguments],
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,  # Ctrl-C reaches the launcher only, which passes it on once
                preexec_fn=_die_with_parent,
            )
            signals.workers.append(worker)
    finally:
        listener.close()  # rank 0 holds its own copy of the socket
    return _wait(signals)


def _wait(signals: _Signals, grace: float = 30.0) -> int:
    workers = signals.workers
    while True:
        codes = [worker.poll() for worker in workers]
        failed = [code for code in codes if code not in (None, 0, EXIT_STOPPED)]
        if failed or all(code is not None for code in codes):
            break
        time.sleep(0.2)
    if failed:  # the others would wait on the dead rank until the collective's timeout: stop them
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        deadline = time.monotonic() + grace
        for worker in workers:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        return failed[0] if failed[0] > 0 else 128 - failed[0]
    return EXIT_STOPPED if EXIT_STOPPED in codes else 0


def launch(arguments: Sequence[str], *, nproc: int, max_restarts: int = 0) -> int:
    """Run ``damformer ARGUMENTS`` on ``nproc`` local workers; the job's exit code."""
    with _Signals() as signals:
        for attempt in range(max_restarts + 1):
            code = _attempt(arguments, nproc, attempt, signals)
            if code in (0, EXIT_STOPPED) or signals.received is not None:
                return code
            if attempt < max_restarts:
                restart = f"restart {attempt + 1} of {max_restarts}"
                print(
                    f"damformer launch: a worker failed (exit {code}); {restart}", file=sys.stderr, flush=True
                )
        return code


def main(argv: Sequence[str] | None = None) -> int:
    """``damformer launch --nproc N [--max-restarts R] -- COMMAND ...``."""
    parser = argparse.ArgumentParser(prog="damformer launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="worker processes (one per GPU)")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts after a failing worker")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the damformer command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.nproc < 1 or args.max_restarts < 0 or not command:
        parser.error("expected --nproc >= 1, --max-restarts >= 0 and a command after --")
    return launch(command, nproc=args.nproc, max_restarts=args.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
