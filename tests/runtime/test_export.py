"""damformer export and damformer.load_model: what a colleague gets computes what the checkpoint computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch

import damformer
from damformer.cli import main
from damformer.config import load_config
from damformer.engine.train import Trainer
from damformer.runtime.export import example_inputs
from damformer.runtime.model_files import open_model

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def run_folder(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, optim={"max_iters": 2}, eval={"interval": 0}))).run()
    return run


def test_export_then_load_gives_the_checkpoints_logits(run_folder, tmp_path, capsys):
    out = tmp_path / "exported"
    args = ["export", "--checkpoint", str(run_folder / "checkpoint.pt"), "--out", str(out)]
    assert main([*args, "--torchscript", "--trace-size", "64"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "model.json",
        "README.md",
        "model.torchscript.pt",
    }
    card = (out / "README.md").read_text()
    assert "# DAM-Former RGB+NIR+E+T (student)" in card and "target test split: mIoU" in card
    assert "damformer commit:" in card and "UDA self-training; 2 iterations" in card
    record = json.loads((out / "model.json").read_text())
    assert record["format"] == 1 and record["model"]["arch"] == "damformer" and len(record["classes"]) == 13
    reference = open_model(run_folder / "checkpoint.pt").model
    for source in (out, run_folder, run_folder / "checkpoint.pt"):  # an export, a run folder, a checkpoint
        model = damformer.load_model(source)
        assert not model.training  # eval mode: dropout and drop-path off
        inputs = example_inputs(open_model(source).config, 64, dates=4)
        with torch.no_grad():
            assert torch.equal(model(*inputs)["hr"], reference(*inputs)["hr"]), source
    traced = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(traced(*inputs), reference(*inputs)["hr"], rtol=1e-5, atol=1e-5)
    # the export is a fraction of the checkpoint (no teacher, optimiser or data cursors)
    assert (out / "model.safetensors").stat().st_size < 0.5 * (run_folder / "checkpoint.pt").stat().st_size
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err


def test_predict_and_evaluate_take_an_exported_folder(run_folder, tiny_shards, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run_folder), "--out", str(out)]) == 0
    root = str(tiny_shards["south"].parents[1] / "flair2")
    maps = {}
    for name, checkpoint in (("ckpt", run_folder / "checkpoint.pt"), ("export", out)):
        args = ["predict", "--checkpoint", str(checkpoint), "--src", root, "--domains", "north"]
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        maps[name] = sorted((tmp_path / name).rglob("*.tif"))
    assert maps["ckpt"] and [p.name for p in maps["ckpt"]] == [p.name for p in maps["export"]]
    for a, b in zip(maps["ckpt"], maps["export"], strict=True):
        with rasterio.open(a) as first, rasterio.open(b) as second:
            assert np.array_equal(first.read(), second.read())
    capsys.readouterr()
    shards = str(tiny_shards["north-test"])
    scores = []
    for checkpoint in (run_folder / "checkpoint.pt", out):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--shards", shards, "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["miou"])
    assert scores[0] == scores[1]
