"""The trained demo checkpoint: predict reproduces the mIoU that evaluate reports on the same patches.

Needs a finished `make demo` (8 minutes on 2 cores, too long for CI): it runs where one exists, at
$DAMFORMER_DEMO_DIR or runs/demo, and says why it is skipped elsewhere. The same code path is tested
in CI with a small trained checkpoint (test_predict.py).
"""

import os
import re
from pathlib import Path

import pytest

from damformer.cli import main

DEMO = Path(os.environ.get("DAMFORMER_DEMO_DIR", "runs/demo"))
CHECKPOINT = DEMO / "damformer" / "checkpoint.pt"


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"no finished demo run at {DEMO} (make demo)")
def test_demo_checkpoint_predict_reproduces_evaluate(tmp_path, capsys):
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--checkpoint",
                str(CHECKPOINT),
                "--shards",
                str(DEMO / "shards" / "north-test"),
            ]
        )
        == 0
    )
    evaluated = capsys.readouterr().out
    args = [
        "-q",
        "predict",
        "--checkpoint",
        str(CHECKPOINT),
        "--src",
        str(DEMO / "flair2"),
        "--domains",
        "north",
    ]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 0
    predicted = capsys.readouterr().out

    def miou(text: str) -> float:
        return float(re.search(r"^mIoU \(13 classes\)\s+([\d.]+)$", text, re.MULTILINE).group(1))

    assert miou(predicted) == miou(evaluated), (evaluated, predicted)
    assert len(list((tmp_path / "maps").rglob("PRED_*.tif"))) > 0
