"""Nothing lost: Ctrl-C, --resume without a checkpoint, a failing final evaluation, shard --overwrite.

Each of these lost work (or silently restarted it) before issue 21; each test fails on that code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from damformer.config import load_config
from damformer.engine.stop import StopRequest
from damformer.engine.train import Trainer
from damformer.errors import OutputExistsError
from damformer.runtime.artifacts import load_checkpoint
from damformer.runtime.distributed import DistContext
from damformer.shards.writer import write_shards
from tests.helpers import train_command
from tests.helpers.training_process import start_training

pytestmark = pytest.mark.timeout(300)
NO_EVAL = {"eval": {"interval": 0}}


def _train_command(overrides: list[str], *extra: str) -> list[str]:
    return train_command(overrides, *extra, log_level="INFO")  # the resume and fresh-start lines read here


def test_ctrl_c_checkpoints_after_the_step_and_resume_continues(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    sections = {**NO_EVAL, "optim": {"max_iters": 200}, "log": {"checkpoint_interval": 1000}}
    overrides = tiny_overrides(run, **sections)
    process, _ = start_training(_train_command(overrides))
    time.sleep(3)
    assert not (run / "checkpoint.pt").is_file()  # the next periodic checkpoint would only come at 1000
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = process.communicate(timeout=60)
    assert process.returncode == 75, err  # like SIGTERM: checkpoint written, "resume me"
    stopped_at = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert 0 < stopped_at < 200 and "SIGINT" in out and "Traceback" not in err
    assert "press Ctrl-C again to abort" in err
    resumed = subprocess.run(
        _train_command(tiny_overrides(run, **NO_EVAL, optim={"max_iters": stopped_at + 2}), "--resume"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoint.pt'} at iteration {stopped_at}" in resumed.stderr


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a background shell job
    with StopRequest(DistContext()) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason() == "SIGINT"  # the first: a stop request, acted on after the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored on exit


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tiny_overrides, tmp_path):
    run = tmp_path / "never-trained"
    result = subprocess.run(
        _train_command(tiny_overrides(run, **NO_EVAL), "--resume"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"{run / 'checkpoint.pt'}: no checkpoint to resume from" in result.stderr
    assert "--auto-resume" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()  # nothing written


def test_auto_resume_starts_fresh_and_says_so(tiny_overrides, tmp_path):
    run = tmp_path / "first-attempt"
    overrides = tiny_overrides(run, **NO_EVAL, optim={"max_iters": 2})
    result = subprocess.run(
        [*_train_command(overrides, "--auto-resume")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "starting fresh (--auto-resume)" in result.stderr
    again = subprocess.run(
        _train_command(tiny_overrides(run, **NO_EVAL, optim={"max_iters": 3}), "--auto-resume"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tiny_overrides, tiny_shards, tmp_path):
    test_set = tmp_path / "north-test"
    shutil.copytree(tiny_shards["north-test"], test_set)
    # A corrupt test shard that only the evaluation at the end reads: the last one (the first shard of
    # every set is decoded at start-up, checked against the model: that corruption never trains).
    shard = sorted(test_set.glob("*.tar"))[-1]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    run = tmp_path / "run"
    overrides = tiny_overrides(
        run, data={"target_test": [str(test_set)]}, log={"checkpoint_interval": 0}, eval={"interval": 0}
    )
    result = subprocess.run(_train_command(overrides), capture_output=True, text=True, check=False)
    assert result.returncode == 2 and shard.name in result.stderr, result.stderr
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 6  # all the training is kept
    shard.write_bytes(good)
    trainer = Trainer(load_config(None, overrides))
    resumed = trainer.run(resume=True)  # only the evaluation runs again
    assert resumed.scores is not None and (run / "scores.json").is_file()
    assert load_checkpoint(run / "checkpoint.pt")["evaluations"][-1]["iteration"] == 6


def test_shard_overwrite_removes_only_the_files_of_the_set(tiny_root, tmp_path):
    from damformer.data import Flair2Dataset

    out = tmp_path / "shards"
    write_shards(Flair2Dataset(tiny_root, domains=["south"]), out)
    mine = sorted(p.name for p in out.iterdir())
    keep = {"backup.tar": b"k\n", "notes.tar.json": b"{}", "D999_2020-00000.tar.bak": b"x"}
    # named like shards, but not listed by the manifest: a user's files, or another domain's shard
    keep |= {"backup-20240.tar": b"b", "my_photos-00001.tar": b"p", "D099_2020-00000.tar": b"d"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    other = Flair2Dataset(tiny_root, domains=["south"], with_s2=False)  # other parameters
    write_shards(other, out, overwrite=True)
    for name, data in keep.items():
        assert (out / name).read_bytes() == data, name
    assert all((out / name).exists() for name in mine)  # rewritten under the same scheme
    # a file the new set would write over, which the previous manifest does not list: named, kept
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["shards"].pop(0)["name"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / dropped).write_bytes(b"not a shard of this set")
    with pytest.raises(OutputExistsError, match=f"{dropped}: not listed by .*manifest.json"):
        write_shards(Flair2Dataset(tiny_root, domains=["south"]), out, overwrite=True)
    assert (out / dropped).read_bytes() == b"not a shard of this set"


def _flip_a_byte_in_aerial(shard: Path) -> None:
    """One flipped bit in the pixel data of the first aerial.npy: the tar itself stays valid."""
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("aerial.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("rcs", [False, True])
def test_a_flipped_byte_in_a_shard_is_not_trained_on_silently(rcs, tiny_overrides, tiny_shards, tmp_path):
    south = tmp_path / "south"
    shutil.copytree(tiny_shards["south"], south)
    shard = sorted(south.glob("*.tar"))[0]
    _flip_a_byte_in_aerial(shard)
    sections = {**NO_EVAL, "data": {"source": [str(south)]}, "uda": {"rcs": rcs}, "optim": {"max_iters": 2}}
    command = _train_command(tiny_overrides(tmp_path / "run", **sections))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    assert f"{shard}: sha256 mismatch" in result.stderr and "data.on_error=skip" in result.stderr
    assert "Traceback" not in result.stderr
    sections["data"]["on_error"] = "skip"
    command = _train_command(tiny_overrides(tmp_path / "skip", **sections))
    skipped = subprocess.run(command, capture_output=True, text=True, check=False)
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipping {shard.name}" in skipped.stderr
