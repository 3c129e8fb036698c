"""Layers: prediction and evaluation load no training machinery (a map server needs no trainer)."""

import subprocess
import sys

TRAINING = ("damformer.engine.train", "damformer.engine.strategies.base", "damformer.engine.optim",
            "damformer.engine.strategies.deepspeed", "damformer.engine.data", "damformer.uda")  # fmt: skip


def _loaded(*modules: str) -> set[str]:
    code = f"import sys; import {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_predict_and_evaluate_import_no_training_module():
    loaded = _loaded("damformer.predict.run", "damformer.predict.mosaic", "damformer.eval.evaluate")
    assert not [m for m in loaded if m.startswith(TRAINING)], sorted(
        m for m in loaded if m.startswith(TRAINING)
    )


def test_predict_help_does_not_import_the_trainer():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "damformer", "predict", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "damformer.engine.train" not in result.stderr and "| damformer.predict" not in result.stderr
