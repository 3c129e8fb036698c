"""Logging of the damformer command: -q, other ranks' voice, progress lines in log files."""

import subprocess
import sys

import pytest

PROBE = """
import logging
from damformer.logs import RANK_LOCAL, configure_logging
configure_logging(None, quiet=False)
log = logging.getLogger("damformer.probe")
log.info("an info line")
log.warning("a warning every rank would repeat")
log.warning("a warning about this rank", extra=RANK_LOCAL)
log.error("an error")
import warnings
warnings.warn("a library UserWarning")
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_other_ranks_log_only_errors_and_their_own_warnings(rank):
    env = {"RANK": rank, "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    if rank == "0":
        for text in (
            "an info line",
            "a warning every rank",
            "a warning about this rank",
            "an error",
            "UserWarning",
        ):
            assert text in result.stderr, result.stderr
    else:
        assert "an info line" not in result.stderr and "every rank would repeat" not in result.stderr
        assert "UserWarning" not in result.stderr
        assert "WARNING [rank 1] damformer.probe: a warning about this rank" in result.stderr
        assert "ERROR [rank 1] damformer.probe: an error" in result.stderr


def test_quiet_silences_info_and_progress_and_logs_keep_whole_lines(tmp_path):
    def synth(*flags: str) -> str:
        command = [sys.executable, "-m", "damformer", *flags, "synth", "--out", str(tmp_path / "f2")]
        command += ["--patches-per-zone", "1", "--overwrite"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        return result.stderr

    logged = synth()  # stderr is a pipe, as in launch/demo.sh's .log files
    assert "INFO damformer.progress: synth zones: " in logged and " done in " in logged
    assert "\r" not in logged and "%|" not in logged  # no tqdm redraws in a log file
    assert synth("-q") == ""
    assert "INFO" in synth("-q", "--log-level", "INFO")  # an explicit level wins over -q
