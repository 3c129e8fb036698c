"""Freed CPU memory is kept for reuse: big tensors allocated again do not page-fault again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# In a fresh interpreter: a "step" that holds three big tensors at once (above glibc's largest mmap
# threshold, as the activations of a training step are) and frees them, repeated; count the minor page
# faults of the steps after a warm-up.
PROBE = """
import json, resource
import torch
from damformer.engine.cpu_memory import retain_freed_memory
applied = retain_freed_memory()
def step():
    blocks = [torch.ones(mib * 1024 * 1024 // 4) for mib in (40, 64, 96)]
    del blocks
for _ in range(10):  # warm-up: the heap grows to its working size (fragments coalesce)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = (40 + 64 + 96) * 1024 * 1024 // 4096  # touched per step


def _probe(**env: str) -> dict:
    tuning = ("MALLOC_", "DAMFORMER_CPU_ALLOCATOR")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(tuning)}
    completed = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reallocated_big_tensors_do_not_fault_again():
    kept = _probe()
    assert kept["applied"] is True
    assert kept["faults"] < PAGES / 10  # the freed block is reused: its pages stay mapped
    # the opt-out restores glibc's behaviour: every allocation maps and zero-fills fresh pages
    system = _probe(DAMFORMER_CPU_ALLOCATOR="system")
    assert system["applied"] is False
    assert system["faults"] > PAGES / 2


def test_a_user_tuned_allocator_is_left_alone():
    assert _probe(MALLOC_ARENA_MAX="2")["applied"] is False
