"""What keeps a GPU busy, checked on CPU: one graph per model, no host sync inside a step, no mlflow needed.

- ``torch.compile(model, fullgraph=True)`` captures every shipped config (the ablation's 16 and the
  demo's), so the whole forward is one graph: no data-dependent branch, no boolean-mask gather.
- Between log intervals a training step never waits for the device: no ``.item()``, ``float()``,
  ``bool()``, ``.tolist()``, ``.cpu()`` or ``.numpy()`` on a tensor from damformer's code (counted here
  on CPU; on a GPU ``torch.cuda.set_sync_debug_mode("error")`` checks the same, when one is present).
- ``log.tracking: false`` never imports mlflow (missing on offline GPU nodes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from damformer.config import load_config
from damformer.engine.train import Trainer
from damformer.models.factory import ModelConfig, build_model

pytestmark = pytest.mark.timeout(600)
CONFIGS = Path(__file__).parents[2] / "configs"
SHIPPED = sorted((CONFIGS / "ablation").glob("*-*.yaml")) + sorted((CONFIGS / "demo").glob("*.yaml"))  # cells


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_every_shipped_config_compiles_into_one_graph(path):
    values = yaml.safe_load(path.read_text())["model"]
    # small sizes for CI: the graph's structure is the config's, the widths are not
    values |= {"backbone": "mit_b0", "pretrained": "none", "utae_widths": [16, 16, 16, 16], "footprint": 0.25}
    torch._dynamo.reset()  # each config is a new model: a fresh cache, not a recompile of the last
    torch.manual_seed(0)
    model = build_model(ModelConfig(**values))
    aerial = torch.randint(0, 256, (2, 5, 64, 64), dtype=torch.uint8)
    s2 = torch.rand(2, 3, 10, 16, 16) * 3000
    mask = torch.tensor([[True, True, True], [True, True, False]])  # a padded date
    days = torch.tensor([[10, 40, 70], [15, 45, 0]])
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fails on any graph break
    out = compiled(aerial, s2, mask, days)
    loss = out["hr"].float().mean() + (out["lr"].float().mean() if out["lr"] is not None else 0)
    loss.backward()
    assert out["hr"].shape == (2, 13, 64, 64)


def test_run_compile_trains_with_compiled_forwards(tiny_overrides, tmp_path):
    torch._dynamo.reset()
    # aot_eager: forward and backward traced as graphs, without inductor's code generation (minutes on CI)
    run = {"compile": True, "compile_backend": "aot_eager"}
    overrides = tiny_overrides(tmp_path, optim={"max_iters": 3}, eval={"interval": 0}, run=run)
    trainer = Trainer(load_config(None, overrides))
    assert type(trainer.uda.student_forward).__name__ == "OptimizedModule"
    result = trainer.run()
    assert result.iterations == 3 and all(
        torch.isfinite(torch.tensor(e["loss_source"])) for e in result.history
    )
    assert "loss_mixed" in result.history[-1] and result.scores is not None  # the teacher's pass ran too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher graphs


SYNCING = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


def _count_syncs_from_damformer(monkeypatch) -> list[str]:
    """Patch the tensor methods that wait for the device; record the calls made by damformer's code."""
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("damformer"):
                calls.append(f"{_name} in {module}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_sync_inside_a_training_step(precision, tiny_overrides, tmp_path, monkeypatch):
    sections = {"eval": {"interval": 0}, "log": {"interval": 5}, "run": {"precision": precision}}
    sections["uda"] = {"source_warmup": 0, "mic": True, "feature_distance": False, "region_loss": "dice"}
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, **sections)))
    trainer.step()  # the first step (source and target streams open)
    calls = _count_syncs_from_damformer(monkeypatch)
    for _ in range(3):  # steps between log intervals
        trainer.step()
    assert calls == [], calls
    monkeypatch.undo()
    entries = trainer.flush_metrics()  # at the log interval: read once
    assert len(entries) == 4 and {"loss_source", "loss_mixed", "pseudo_confidence"} <= set(entries[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_inside_a_training_step_on_cuda(tiny_overrides, tmp_path):
    sections = {
        "eval": {"interval": 0},
        "log": {"interval": 5},
        "run": {"device": "cuda", "precision": "bf16"},
    }
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, **sections)))
    trainer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(trainer.flush_metrics()) == 4


def test_tracking_off_never_imports_mlflow(tiny_overrides, tmp_path):
    overrides = tiny_overrides(tmp_path / "run", optim={"max_iters": 2}, eval={"interval": 0})
    assert "log.tracking=false" in overrides
    code = (
        "import sys; sys.modules['mlflow'] = None  # any import of mlflow fails, as where it is missing\n"
        "from damformer.cli import main\n"
        f"sys.exit(main({['-q', 'train', '/dev/null', *[p for o in overrides for p in ('--set', o)]]!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
