"""damformer evaluate as scripts use it: --json prints one strict JSON document, equal to the table."""

import json
import math
import subprocess

from damformer.config import load_config
from damformer.engine.train import Trainer
from tests.helpers import damformer_command


def test_evaluate_json_is_strict_json_with_the_printed_scores(tiny_overrides, tiny_shards, tmp_path):
    Trainer(
        load_config(None, tiny_overrides(tmp_path / "run", optim={"max_iters": 2}, eval={"interval": 0}))
    ).run()
    checkpoint, shards = str(tmp_path / "run" / "checkpoint.pt"), str(tiny_shards["north-test"])
    command = damformer_command("evaluate", "--checkpoint", checkpoint, "--shards", shards)
    table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    printed = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout
    scores = json.loads(printed, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert scores["model"] == "DAM-Former RGB+NIR+E+T" and scores["iteration"] == 2
    assert f"{100 * scores['miou']:.2f}" in table and len(scores["iou_by_class"]) == 13
    assert all(v is None or math.isfinite(v) for v in scores["iou"])  # NaN (absent class) is null
