"""Golden losses: the debug config's first 20 losses (CPU, fp32, seed 0) against a stored copy.

Run-against-run reproducibility cannot catch a refactor that changes the maths the same way twice;
this can. The stored values come from `configs/debug.yaml` on the tests' tiny shards. After a change
that is meant to change the maths, refresh them on purpose and say so in the commit:

    DAMFORMER_REFRESH_GOLDEN=1 python -m pytest tests/engine/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from damformer.config import load_config
from damformer.engine.train import Trainer

ROOT = Path(__file__).parents[2]
GOLDEN = ROOT / "tests" / "golden" / "debug_losses.json"
KEYS = ("loss_source", "loss_mixed", "loss_mic", "pseudo_confidence")


def test_the_debug_config_reproduces_its_golden_losses(tiny_shards, tmp_path):
    roles = (("source", "south"), ("target", "north"), ("target_test", "north-test"))
    overrides = [f"data.{role}={json.dumps([str(tiny_shards[name])])}" for role, name in roles]
    overrides.append(f"run.output_dir={tmp_path / 'debug'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
    try:
        history = Trainer(load_config(ROOT / "configs" / "debug.yaml", overrides)).run().history
    finally:
        torch.set_num_threads(threads)
    losses = [{key: entry[key] for key in KEYS if key in entry} for entry in history]
    assert len(losses) == 20
    if os.environ.get("DAMFORMER_REFRESH_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
        pytest.skip(f"refreshed {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    for step, (mine, stored) in enumerate(zip(losses, golden, strict=True)):
        assert mine.keys() == stored.keys(), f"step {step}: other losses ({sorted(mine)} vs {sorted(stored)})"
        for key, value in stored.items():
            # another CPU's kernels: float noise, a few pixels across the confidence threshold (1 / 8192
            # each); a change of the maths moves the losses far more
            assert mine[key] == pytest.approx(value, rel=1e-3, abs=5e-4), f"step {step}: {key}"
