"""The launch/ scripts start real jobs: two "nodes" on localhost (c10d), DeepSpeed's launcher, one node."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from damformer.runtime.artifacts import load_checkpoint
from tests.helpers import free_port
from tests.helpers.torchrun import clean_env

pytestmark = pytest.mark.timeout(300)
LAUNCH = Path(__file__).parents[2] / "launch"


def _sets(overrides: list[str]) -> list[str]:
    return [part for assignment in overrides for part in ("--set", assignment)]


def _launch(script: str, overrides: list[str], **variables: str) -> subprocess.Popen:
    env = dict(clean_env(), **variables)
    return subprocess.Popen(
        ["bash", str(LAUNCH / script), "/dev/null", *_sets(overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err[-4000:]
    return out, err


def test_two_nodes_with_c10d_rendezvous(tiny_overrides, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    overrides = tiny_overrides(tmp_path / "nodes", optim={"max_iters": 2}, eval={"interval": 0})
    nodes = [
        _launch(
            "multinode.sh",
            overrides,
            NNODES="2",
            RDZV_ENDPOINT=endpoint,
            RDZV_ID=f"test{os.getpid()}",
            GPUS="1",
        )
        for _ in range(2)
    ]
    outputs = [_finish(node) for node in nodes]
    state = load_checkpoint(tmp_path / "nodes" / "checkpoint.pt")
    assert state["world_size"] == 2 and state["iteration"] == 2
    assert len(set(state["student_digests"])) == 1
    assert sum("x 2 ranks" in out for out, _ in outputs) == 1  # rank 0 speaks, on whichever node it is


def test_deepspeed_launcher_with_zero1(tiny_overrides, tmp_path):
    overrides = tiny_overrides(tmp_path / "ds", optim={"max_iters": 2}, eval={"interval": 0})
    _, err = _finish(_launch("deepspeed.sh", overrides, GPUS="2", ZERO="1", MASTER_PORT=str(free_port())))
    assert "DeepSpeed ZeRO stage 1" in err
    state = load_checkpoint(tmp_path / "ds" / "checkpoint.pt")
    assert state["engine"] == "deepspeed" and state["world_size"] == 2 and state["iteration"] == 2


def _process_tree(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grown = {root}, True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return tree


def _listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) of the sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_single_node_launcher_keeps_every_socket_on_the_loopback(tiny_overrides, tmp_path):
    overrides = tiny_overrides(tmp_path / "one", optim={"max_iters": 30}, eval={"interval": 0})
    process = _launch("torchrun.sh", overrides, GPUS="2")
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and len(seen) < 3:
        seen |= _listening_addresses(_process_tree(process.pid))  # the store and gloo's mesh
        time.sleep(0.2)
    out, _ = _finish(process)
    assert len(seen) >= 1 and seen <= LOOPBACK, seen  # torchrun --standalone listened on :: (all)
    assert "x 2 ranks" in out
    assert load_checkpoint(tmp_path / "one" / "checkpoint.pt")["world_size"] == 2
