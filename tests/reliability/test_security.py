"""Security: crafted checkpoints run no code, servers listen on the loopback, no shell strings.

Crafted tar member names (absolute, ``..``, links, unknown keys, a key split in two groups) are refused
in tests/shards/test_shards.py (``test_crafted_member_names_are_refused`` and its neighbours).
"""

from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from damformer.runtime.artifacts import CheckpointError, load_checkpoint
from damformer.tracking.ui import UIError, is_loopback, resolve_one_store, ui_command
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pt"  # a bare pickle, as torch.save(_use_new_zipfile_serialization=False)
    plain.write_bytes(pickle.dumps({"format": 1, "uda": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="incomplete or not a damformer checkpoint"):
        load_checkpoint(plain)
    zipped = tmp_path / "zipped.pt"  # a well-formed torch zip archive whose pickle carries the payload
    torch.save({"format": 1, "uda": _Payload(marker)}, zipped)
    with pytest.raises(
        CheckpointError, match="not weights .*unsupported GLOBAL posix.system.*refused without running it"
    ):
        load_checkpoint(zipped)
    assert not marker.exists()
    # the same refusal through the command line: one line, exit 2
    output = tmp_path / "run"
    output.mkdir()
    (output / "checkpoint.pt").write_bytes(zipped.read_bytes())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "damformer",
            "evaluate",
            "--checkpoint",
            str(output / "checkpoint.pt"),
            "--shards",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "checkpoint.pt: cannot read the checkpoint" in result.stderr
    assert not marker.exists()


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.timeout(180)
def test_the_ui_server_binds_to_the_loopback_by_default(tmp_path):
    from damformer.tracking.mlflow_tracker import Tracker

    run = tmp_path / "run"
    run.mkdir()
    store = f"sqlite:///{run / 'mlflow.db'}"
    tracker = Tracker(store, "security", "a run", artifact_root=run / "mlartifacts")
    tracker.log_metrics({"mIoU": 50.0}, step=1)
    tracker.finish()
    assert tracker.run_id is not None
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "damformer", "ui", str(run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _listening_addresses(port):
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.5)
        assert _listening_addresses(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        server.terminate()  # SIGTERM, as from a job's end: the MLflow server (its own group) goes too
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _listening_addresses(port):
            time.sleep(0.5)
        assert not _listening_addresses(port), "an MLflow server outlived damformer ui"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()


def test_ui_finds_the_store_refuses_none_or_two_and_binds_the_loopback(tmp_path):
    folder = tmp_path / "runs"
    (folder / "uda").mkdir(parents=True)
    with pytest.raises(UIError, match="no MLflow store"):
        resolve_one_store([folder / "uda"])
    (folder / "mlflow.db").write_bytes(b"")
    store = (folder / "mlflow.db").resolve()
    for path in (folder, folder / "uda", folder / "mlflow.db"):  # a folder of runs, a run, the file
        assert resolve_one_store([path]) == store
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mlflow.db").write_bytes(b"")
    with pytest.raises(UIError, match="paths in 2 different MLflow stores"):
        resolve_one_store([folder / "uda", tmp_path / "other"])
    command = ui_command(store)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def _tracked_run(folder: Path) -> Path:
    from damformer.tracking.mlflow_tracker import Tracker

    folder.mkdir()
    store = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(store, "ui", "a run", artifact_root=folder / "mlartifacts")
    tracker.finish()
    return folder


def test_ui_on_a_busy_port_is_one_line_and_non_zero(tmp_path):
    run = _tracked_run(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "damformer", "ui", str(run), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr  # was 0 after a buried message
    assert f"port {port} on 127.0.0.1 is not free" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _processes_listening_on(port: int) -> set[int]:
    inodes = {line.split()[9] for table in ("/proc/net/tcp", "/proc/net/tcp6")
              for line in Path(table).read_text().splitlines()[1:]
              if line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port}  # fmt: skip
    owners = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                owners.add(int(fd.parts[2]))
        except OSError:
            continue
    return owners


def test_sigterm_to_the_ui_stops_the_server_it_started(tmp_path):
    run = _tracked_run(tmp_path / "run")
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "damformer", "ui", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _listening_addresses(port):
            assert ui.poll() is None, ui.stderr.read()
            time.sleep(0.5)
        servers = _processes_listening_on(port)
        assert servers and ui.pid not in servers  # the MLflow server: a child process
        ui.terminate()  # SIGTERM
        assert ui.wait(timeout=60) == 0
        time.sleep(1)
        assert not _listening_addresses(port)  # was orphaned, still listening
        assert not [pid for pid in servers if Path(f"/proc/{pid}").exists()]
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()


# -- no shell strings ---------------------------------------------------------------------------------

SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def _python_files() -> list[Path]:
    return sorted(
        [*REPO.glob("damformer/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("launch/**/*.py")]
    )


def _shell_uses(path: Path) -> list[str]:
    """Calls in ``path`` that would hand a string to a shell."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (
            (func.value.id, func.attr)
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            else None
        )
        where = f"{path}:{node.lineno}"
        if name in SHELL_CALLS or (isinstance(func, ast.Name) and func.id in {"eval", "exec"}):
            found.append(f"{where}: {ast.unparse(func)}")
        if name is not None and name[0] == "subprocess" and name[1] in SUBPROCESS_CALLS:
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and not keyword.value.value
                ):
                    found.append(f"{where}: shell=")
            if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"{where}: a command given as a string")
    return found


def test_no_shell_strings_anywhere_in_the_package():
    files = _python_files()
    assert len(files) > 40  # the walk found the package
    offences = [offence for path in files for offence in _shell_uses(path)]
    assert offences == []


def test_the_checker_catches_each_kind_of_shell_string(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, subprocess\n"
        "os.system('ls ' + name)\n"
        "subprocess.run(f'ls {name}', shell=True)\n"
        "subprocess.Popen('ls')\n"
        "eval(text)\n"
        "subprocess.run(['ls', name])\n"  # fine: an argument list
    )
    found = _shell_uses(sample)
    assert len(found) == 5, found  # os.system, shell=, two string commands, eval
