"""The benchmark machinery measures what it claims: timing order, peak memory, the summary's verdicts.

The full suite (``make bench``) takes minutes and is not run here; these tests run the shared helpers
for real and one script end to end at a tiny size, so a broken benchmark is caught in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import interleaved_seconds, verdict  # noqa: E402
from run_all import summary_rows  # noqa: E402


def test_interleaved_timing_orders_steps_by_their_cost():
    steps = {"slow": lambda: time.sleep(0.03), "fast": lambda: time.sleep(0.003)}
    seconds = interleaved_seconds(steps, torch.device("cpu"), rounds=3)
    assert seconds["slow"] > 3 * seconds["fast"]
    assert seconds["fast"] >= 0.003


def test_peak_memory_sees_a_step_that_allocates_and_frees():
    # in a fresh interpreter, as the benchmarks measure (this process's heap already holds freed memory)
    probe = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import torch
from common import measure_peak
from damformer.runtime.cpu_memory import retain_freed_memory
retain_freed_memory()  # as the benchmarks run
def factory():
    def step():
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched, then freed
        del block
    return step
print(measure_peak(factory, torch.device("cpu")))
"""
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert 48 * 1024 * 1024 <= int(completed.stdout.split()[-1]) <= 128 * 1024 * 1024


def test_verdicts_compare_against_the_target_in_the_right_direction():
    assert verdict(0.9, 1.0).startswith("met")
    assert verdict(1.2, 1.0) == "MISSED by 20%"
    assert verdict(8.0, 5.0, at_most=False).startswith("met")
    assert verdict(3.0, 5.0, at_most=False).startswith("MISSED")


def test_summary_rows_report_each_ratio_with_its_verdict():
    results = {
        "loader": {"shard_over_raw": 8.3},
        "uda": {"variant": "fp32", "uda_over_supervised": 2.7},
        "distributed": {
            "ddp": {"efficiency": 0.95},
            "memory": {
                "ddp": {"world_size": 2, "ranks": [{"optimizer_state_bytes": 800}] * 2},
                "zero1": {"ranks": [{"optimizer_state_bytes": 600}] * 2},
                "zero2": {"ranks": [{"optimizer_state_bytes": 900}] * 2},
            },
        },
    }
    rows = {row[0]: row for row in summary_rows(results)}
    assert rows["data: shard loader / raw tree, samples/s per core"][1:3] == ["8.30x", ">= 5x"]
    assert rows["data: shard loader / raw tree, samples/s per core"][3].startswith("met")
    assert rows["UDA / supervised iteration time (fp32)"][3].startswith("MISSED")  # 2.7 > 2.5
    assert rows["ZERO1 / DDP optimiser state per rank"][1] == "0.75x"
    assert rows["ZERO1 / DDP optimiser state per rank"][3].startswith("met")
    assert rows["ZERO2 / DDP optimiser state per rank"][3].startswith("MISSED")


@pytest.mark.slow
def test_the_uda_benchmark_runs_end_to_end_and_writes_its_results(tmp_path):
    out = tmp_path / "uda.json"
    command = [sys.executable, str(BENCHMARKS / "bench_uda.py"), "--size", "64", "--batch", "1"]
    completed = subprocess.run(
        [*command, "--dates", "3", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "UDA / supervised time:" in completed.stdout
    result = json.loads(out.read_text())
    assert result["backbone"] == "mit_b0"
    assert result["uda_over_supervised"] > 1.0  # UDA adds a teacher pass and a mixed pass
    assert result["peak_bytes"]["uda"] > 0 and result["peak_bytes"]["supervised"] > 0
    assert result["gflop"] > 0


def test_the_loader_benchmark_compares_our_reader_webdataset_and_the_raw_tree(tmp_path):
    out = tmp_path / "loader.json"
    command = [sys.executable, str(BENCHMARKS / "bench_loader.py"), "--patches", "4", "--rounds", "1"]
    completed = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ratio shard/webdataset pipeline" in completed.stdout
    rates = json.loads(out.read_text())["samples_per_s"]
    assert {"raw", "shard", "webdataset", "shard+sha256"} <= set(rates)  # every reader read every sample
    assert all(rate > 0 for rate in rates.values())


def test_the_gpu_session_script_runs_its_steps_under_limits_and_summarises(tmp_path):
    """benchmarks/gpu_session.sh, the demo step on the CPU (DEVICE=cpu): its plumbing, before a GPU loan."""
    env = dict(os.environ, STEPS="demo nonsense", DEVICE="cpu", DEMO_ITERS="2")
    # the plumbing, not the demo's data: a smaller miniature (the 448-patch one takes minutes on 2 cores)
    env["MINIATURE_SYNTH_ARGS"] = "--zones-per-domain 1 --test-zones-per-domain 1 --patches-per-zone 4"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # damformer of this interpreter
    command = ["bash", str(BENCHMARKS / "gpu_session.sh"), "run", str(tmp_path / "out")]
    typo = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=60)
    assert typo.returncode == 2 and "unknown step nonsense" in typo.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()  # checked before any step ran
    env["STEPS"] = "demo"
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["demo-data", "demo-bf16"], summary
    assert all(": exit 0 after " in line for line in summary), summary
    assert "unbound variable" not in result.stdout + result.stderr  # every shell variable set where used
    training = (tmp_path / "out" / "demo-bf16.log").read_text()
    assert "it 2/2 " in training and "it/s" in training and "on cpu" in training
    usage = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare" in usage.stdout and "set -uo" not in usage.stdout
