"""DeepSpeed ZeRO-1/2 with real gloo process groups: equal to one process, sharded checkpoints, resume."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from damformer.config import ConfigError, load_config
from damformer.engine.strategies import deepspeed as deepspeed_engine
from damformer.engine.train import Trainer
from damformer.runtime.artifacts import CheckpointError, load_checkpoint
from tests.helpers.torchrun import EQUIVALENT, one_thread, run, standalone, student, torchrun

pytestmark = pytest.mark.timeout(300)
LAUNCH = Path(__file__).parents[2] / "launch" / "deepspeed"


@pytest.fixture(scope="module", autouse=True)
def deepspeed_ops():
    """The CPU comm op: built once before the suite (make test), loaded from the cache here."""
    if importlib.util.find_spec("deepspeed") is None:  # not importorskip: it would pick the accelerator
        pytest.skip("DeepSpeed is an extra: pip install 'damformer[deepspeed]'")
    deepspeed_engine.build_ops()


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_equals_one_process_with_the_same_global_batch(stage, tiny_overrides, tmp_path):
    single = tiny_overrides(tmp_path / "single", **{**EQUIVALENT, "optim": {"max_iters": 4, "grad_accum": 2}})
    with one_thread():
        Trainer(load_config(None, single)).run()
    zero = {**EQUIVALENT, "dist": {"engine": "deepspeed", "zero_stage": stage}}
    result = run(torchrun(standalone(), tiny_overrides(tmp_path / "zero", **zero)))
    assert f"DeepSpeed ZeRO stage {stage}" in result.stderr
    checkpoint = tmp_path / "zero" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["engine"] == "deepspeed" and state["optimizer"] is None and state["world_size"] == 2
    assert len(set(state["student_digests"])) == 1, "the student differs between the ranks"
    # one sharded checkpoint on disk (the earlier ones are removed once a newer one is committed)
    shards = [folder.name for folder in (tmp_path / "zero" / "deepspeed").iterdir() if folder.is_dir()]
    assert shards == [state["deepspeed"]["tag"]]
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        state["deepspeed"]["files"]
    )
    ours, one = student(checkpoint), student(tmp_path / "single" / "checkpoint.pt")
    assert ours.keys() == one.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    single_history = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["history"]
    for a, b in zip(state["history"], single_history, strict=True):
        assert a["loss_source"] == pytest.approx(b["loss_source"], rel=1e-4)


def test_zero2_uda_bf16_stopped_and_resumed_equals_uninterrupted(tiny_overrides, tmp_path):
    """DAM-Former UDA with MIC (its LR head unused by one backward) under ZeRO-2 and bf16 autocast."""
    sections = {
        "optim": {"max_iters": 4},
        "eval": {"interval": 0},
        "run": {"precision": "bf16"},
        "dist": {"engine": "deepspeed", "zero_stage": 2},
    }
    run(torchrun(standalone(), tiny_overrides(tmp_path / "full", **sections)))
    split = tiny_overrides(tmp_path / "split", **sections)
    run(torchrun(standalone(), split, "--stop-after", "2"))
    first = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert first["iteration"] == 2
    result = run(torchrun(standalone(), split, "--resume"))
    assert "resumed from" in result.stderr and "target test mIoU" in result.stdout
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert resumed["iteration"] == 4 and resumed["history"] == full["history"]
    assert {"loss_source", "loss_mixed", "loss_mic"} <= set(full["history"][-1])
    for name, tensor in full["uda"].items():
        assert torch.equal(resumed["uda"][name], tensor), name
    assert not (tmp_path / "split" / "deepspeed" / first["deepspeed"]["tag"]).exists()


def test_altered_shard_is_refused_on_resume(tiny_overrides, tmp_path):
    sections = {**EQUIVALENT, "dist": {"engine": "deepspeed", "zero_stage": 1}}
    overrides = tiny_overrides(tmp_path / "run", **sections)
    run(torchrun(standalone(), overrides, "--stop-after", "2"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    folder = tmp_path / "run" / "deepspeed" / state["deepspeed"]["tag"]
    shard = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])  # a half-written shard
    with pytest.raises(CheckpointError, match="zero_pp_rank_1.*does not match its checksum"):
        deepspeed_engine.verify_shards(folder.parent, state["deepspeed"], where=tmp_path / "checkpoint.pt")
    shard.unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1.*is missing"):
        deepspeed_engine.verify_shards(folder.parent, state["deepspeed"], where=tmp_path / "checkpoint.pt")


def test_deepspeed_config_merging_and_its_errors(tiny_overrides, tmp_path):
    def config(**dist):
        return load_config(None, tiny_overrides(tmp_path / "out", dist={"engine": "deepspeed", **dist}))

    cpu = torch.device("cpu")
    for stage in (1, 2):  # the shipped JSONs load and give their stage
        merged = deepspeed_engine.deepspeed_config(
            config(deepspeed_config=str(LAUNCH / f"zero{stage}.json")), 4, cpu
        )
        assert merged["zero_optimization"]["stage"] == stage
        assert merged["train_batch_size"] == 2 * 4  # per-rank batch x world size (grad_accum 1)
        assert merged["managed_gradient_accumulation"] is False
        assert "fp16" not in merged  # fp32 run: the JSON's loss-scale settings are not switched on
    assert deepspeed_engine.deepspeed_config(config(), 2, cpu)["zero_optimization"]["stage"] == 2
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match="owned.json.*train_micro_batch_size_per_gpu.*data.batch_size"):
        deepspeed_engine.deepspeed_config(config(deepspeed_config=str(owned)), 2, cpu)
    with pytest.raises(
        ConfigError, match="dist.zero_stage is 1 but .*zero2.json sets zero_optimization.stage 2"
    ):
        deepspeed_engine.deepspeed_config(
            config(deepspeed_config=str(LAUNCH / "zero2.json"), zero_stage=1), 2, cpu
        )
    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        deepspeed_engine.deepspeed_config(config(deepspeed_config=str(broken)), 2, cpu)
    with pytest.raises(ConfigError, match="missing.json not found"):
        deepspeed_engine.deepspeed_config(config(deepspeed_config=str(tmp_path / "missing.json")), 2, cpu)
    fp16 = load_config(
        None, tiny_overrides(tmp_path / "out", dist={"engine": "deepspeed"}, run={"precision": "fp16"})
    )
    with pytest.raises(ConfigError, match="fp16 with dist.engine=deepspeed needs CUDA"):
        deepspeed_engine.deepspeed_config(fp16, 2, cpu)
    with pytest.raises(ConfigError, match="dist.zero_stage: expected 1 or 2, found 3"):
        config(zero_stage=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed fp16 needs CUDA (none visible)")
def test_zero2_fp16_on_cuda_counts_overflow_steps(tiny_overrides, tmp_path):
    sections = {
        "optim": {"max_iters": 3},
        "eval": {"interval": 0},
        "run": {"precision": "fp16", "device": "cuda"},
        "dist": {"engine": "deepspeed", "zero_stage": 2},
    }
    result = run(
        torchrun(
            standalone(1 if torch.cuda.device_count() < 2 else 2),
            tiny_overrides(tmp_path / "fp16", **sections),
        )
    )
    state = load_checkpoint(tmp_path / "fp16" / "checkpoint.pt")
    # DeepSpeed ran (also on one GPU: no fallback to the single-process engine and its GradScaler)
    assert "DeepSpeed ZeRO stage 2" in result.stderr and state["engine"] == "deepspeed" and state["deepspeed"]
    assert all("loss_scale" in entry and "overflow_steps" in entry for entry in state["history"])


def test_deepspeed_runs_on_one_process_too(tiny_overrides, tmp_path, caplog):
    import logging

    sections = {
        "optim": {"max_iters": 2},
        "eval": {"interval": 0},
        "dist": {"engine": "deepspeed", "zero_stage": 1},
    }
    with caplog.at_level(logging.INFO, logger="damformer.engine.strategies.deepspeed"):
        result = Trainer(load_config(None, tiny_overrides(tmp_path / "one", **sections))).run()
    assert result.iterations == 2 and "DeepSpeed ZeRO stage 1" in caplog.text
    state = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert state["engine"] == "deepspeed" and state["world_size"] == 1 and state["optimizer"] is None
    assert (tmp_path / "one" / "deepspeed" / state["deepspeed"]["tag"]).is_dir()
