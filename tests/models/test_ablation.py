"""Every shipped ablation config builds, runs forward and backward on CPU, with logits of the right shape."""

from pathlib import Path

import pytest
import torch
import yaml

from damformer.config import ConfigError, build_section
from damformer.models.factory import ARCHS, ModelConfig, build_model


def _model(path: Path) -> ModelConfig:
    return build_section(ModelConfig, yaml.safe_load(path.read_text())["model"], "model")


ABLATION = Path(__file__).parents[2] / "configs" / "ablation"
CONFIGS = sorted(ABLATION.glob("*-*.yaml"))  # the ARCH-INPUTS cells (miniature.yaml is an overlay)


def test_one_config_per_cell_of_the_ablation():
    cells = {
        (c.arch, c.bands, c.temporal)
        for c in (
            build_section(ModelConfig, yaml.safe_load(p.read_text())["model"], "model") for p in CONFIGS
        )
    }
    expected = {(a, b, t) for a in ARCHS for b in ("rgb", "rgbne") for t in (False, True)}
    assert cells == expected and len(CONFIGS) == 16


def test_every_mit_config_names_its_imagenet_weights():
    for path in CONFIGS:
        config = build_section(ModelConfig, yaml.safe_load(path.read_text())["model"], "model")
        expected = None if config.arch == "unet_c" else f"weights/{config.mit_size}.pth"
        assert config.pretrained == expected, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_runs_forward_and_backward(path):
    torch.manual_seed(0)
    config = build_section(ModelConfig, yaml.safe_load(path.read_text())["model"], "model")
    config.pretrained = "none"  # the shipped size (MiT-b4/b5 where configured), random weights, small input
    model = build_model(config)
    aerial = torch.randint(0, 256, (2, 5, 64, 64), dtype=torch.uint8)
    s2 = torch.rand(2, 3, 10, 16, 16) * 3000
    mask = torch.tensor([[True, True, True], [True, True, False]])
    days = torch.tensor([[10, 40, 70], [15, 45, 0]])
    out = model(aerial, s2, mask, days)
    assert out["hr"].shape == (2, 13, 64, 64)
    loss = torch.nn.functional.cross_entropy(out["hr"], torch.randint(0, 13, (2, 64, 64)))
    if config.temporal:
        assert out["lr"].shape == (2, 13, 64, 64)
        loss = loss + torch.nn.functional.cross_entropy(out["lr"], torch.randint(0, 13, (2, 64, 64)))
    else:
        assert out["lr"] is None
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert len(out["features"]) in (4, 5)


def test_unknown_or_bad_model_keys_are_errors():
    with pytest.raises(ConfigError, match="model: unknown key"):
        build_section(ModelConfig, {"arch": "damformer", "backbon": "mit_b0"}, "model")
    with pytest.raises(ValueError, match="model.arch: expected one of"):
        ModelConfig(arch="segnet")
    with pytest.raises(ValueError, match="model.backbone"):
        ModelConfig(backbone="mit_b9")


def test_names_and_defaults():
    assert ModelConfig().name == "DAM-Former RGB+NIR+E+T"
    assert ModelConfig().mit_size == "mit_b4" and ModelConfig().band_mode == "adapter"
    assert ModelConfig(arch="daformer", bands="rgb", temporal=False).name == "DAFormer RGB"
    assert ModelConfig(arch="unet_t").mit_size == "mit_b5"


def test_segformer_head_alternative_for_daformer():
    model = build_model(ModelConfig(arch="daformer", head="segformer", backbone="mit_b0", temporal=False))
    out = model(torch.randint(0, 256, (1, 5, 64, 64), dtype=torch.uint8))
    assert out["hr"].shape == (1, 13, 64, 64)
    assert type(model.decoder).__name__ == "SegFormerHead"


def test_every_cell_with_the_miniature_overlay_is_a_valid_short_cpu_run():
    from damformer.config import load_config

    for path in CONFIGS:
        config = load_config(path, overlays=[ABLATION / "miniature.yaml"])
        cell = _model(path)
        assert (config.model.arch, config.model.bands, config.model.temporal) == (
            cell.arch,
            cell.bands,
            cell.temporal,
        ), path.name  # the cell's network and inputs survive the overlay
        assert (
            config.model.backbone == "mit_b0" and config.model.pretrained == "none"
        )  # explicit: from scratch
        assert (
            config.optim.warmup < config.optim.max_iters and config.uda.source_warmup < config.optim.max_iters
        )
        assert config.data.source == ["runs/demo/shards/south"], path.name


def test_a_cell_trains_with_the_miniature_overlay_from_the_command_line(tiny_shards, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "damformer", "-q", "train", str(ABLATION / "damformer-rgbne-t.yaml")]
    command += [str(ABLATION / "miniature.yaml"), "--output-dir", str(tmp_path / "run")]
    for key, value in (
        ("data.source", f"[{tiny_shards['south']}]"),  # the tests' shards instead of runs/demo's
        ("data.target", f"[{tiny_shards['north']}]"),
        ("data.target_test", f"[{tiny_shards['north-test']}]"),
        ("model.footprint", "0.032"),
        ("optim.max_iters", "3"),
        ("uda.source_warmup", "1"),
        ("log.tracking", "false"),
    ):
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["arch"] == "damformer" and saved["model"]["backbone"] == "mit_b0"
    assert saved["optim"]["warmup"] == 20 and saved["uda"]["ema_alpha"] == 0.99  # from the overlay
