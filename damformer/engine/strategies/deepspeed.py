"""DeepSpeed ZeRO stage 1/2 around our student and AdamW, and its sharded checkpoints.

    torchrun --nproc_per_node=4 -m damformer train CONFIG --set dist.engine=deepspeed
        --set dist.deepspeed_config=launch/deepspeed/zero2.json   # (one line)

ZeRO-1 partitions the optimiser state over the ranks, ZeRO-2 the gradients too; the weights stay
whole on every rank (stage 3 would partition them, and the EMA teacher reads them every step).
We hand DeepSpeed our own torch AdamW (a DeepSpeed "Adam" would compile fused_adam, infra.md) and
run it with ``managed_gradient_accumulation: false``: the UDA step calls ``backward`` two or three
times per micro-batch (source, mixed, MIC), and ``step()`` is the one accumulation boundary.

Precision: bf16 is plain autocast around an fp32 model, as under DDP. fp16 is DeepSpeed's own
path (the V100 path): weights in half, fp32 master weights in the ZeRO partitions and DeepSpeed's
dynamic loss scaler, which skips and counts overflowing steps. DeepSpeed's CPU accelerator has no
fp16, so that combination is refused on CPU before any compute.

Checkpoints: every rank writes its optimiser shard with ``engine.save_checkpoint`` into
``OUTPUT/deepspeed/<tag>/``; then rank 0 writes ``OUTPUT/checkpoint.pt`` (our state: student,
teacher, RNG and stream cursors per rank) naming the tag and the SHA-256 of each shard file. That
atomic rename is the commit point: a crash before it leaves the previous checkpoint.pt, whose tag
is still on disk, and a shard that does not match its checksum is refused on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from damformer.config import ConfigError, RunConfig
from damformer.config.batch import LEGACY_RANK_BATCH
from damformer.engine.strategies.base import Strategy
from damformer.runtime.artifacts import DEEPSPEED_RECORD, CheckpointError
from damformer.runtime.distributed import barrier, gather_objects

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"  # under the run's output folder

# Keys the run config owns: a DeepSpeed JSON that sets them would silently disagree with it.
OWNED_KEYS = {
    "train_batch_size": "data.batch_size x world size x optim.grad_accum",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.* (our AdamW with DAFormer's parameter groups)",
    "scheduler": "optim.warmup / optim.max_iters (warmup + poly, set every step)",
    "bf16": "run.precision",
    "torch_autocast": "run.precision",
    "managed_gradient_accumulation": "nothing: the UDA step needs it false",
}
FP16_SETTINGS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale", "loss_scale")

DEFAULT_ZERO = {
    # Buckets of 50M elements (200 MB in fp32): large enough for bandwidth, small next to a V100's 16 GB.
    "reduce_bucket_size": 50_000_000,
    "allgather_bucket_size": 50_000_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"dist.deepspeed_config: {path} not found (shipped: launch/deepspeed/zero1.json, zero2.json)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"dist.deepspeed_config: {path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        found = type(value).__name__
        raise ConfigError(f"dist.deepspeed_config: {path}: expected a JSON object, found {found}")
    return value


def deepspeed_config(config: RunConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of this run: the user's JSON (if any) plus what the run config owns.

    Raises:
        ConfigError: the JSON is unreadable, sets a key the run config owns, disagrees with
            ``dist.zero_stage``, or asks for fp16 on CPU.
    """
    user: dict[str, Any] = {}
    source = "the built-in defaults"
    if config.dist.deepspeed_config:
        path = Path(config.dist.deepspeed_config)
        user, source = _read_json(path), str(path)
        for key, owner in OWNED_KEYS.items():
            if key in user:
                raise ConfigError(
                    f"{path}: {key!r} is set by the run config ({owner}); remove it from the JSON"
                )
        unknown_fp16 = set(user.get("fp16", {})) - set(FP16_SETTINGS)
        if unknown_fp16:
            raise ConfigError(
                f"{path}: fp16 keys {sorted(unknown_fp16)} are not allowed (fp16 is switched on by "
                f"run.precision=fp16; allowed here: {', '.join(FP16_SETTINGS)})"
            )
    zero = {**DEFAULT_ZERO, **user.get("zero_optimization", {})}
    json_stage = user.get("zero_optimization", {}).get("stage")
    stage = config.dist.zero_stage if config.dist.zero_stage is not None else (json_stage or 2)
    if json_stage is not None and json_stage != stage:
        raise ConfigError(
            f"dist.zero_stage is {stage} but {source} sets zero_optimization.stage {json_stage}: "
            "drop one of them"
        )
    if stage not in (1, 2):
        raise ConfigError(f"{source}: zero_optimization.stage must be 1 or 2, found {stage!r}")
    zero["stage"] = stage
    optim = config.optim
    batch = config.data.batch_size or LEGACY_RANK_BATCH  # the trainer passes it resolved (config.batch)
    merged: dict[str, Any] = {
        **{k: v for k, v in user.items() if k not in ("zero_optimization", "fp16")},
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": batch * optim.grad_accum * world_size,
        "gradient_clipping": float(optim.grad_clip or 0.0),
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "steps_per_print": user.get("steps_per_print", 2**31 - 1),  # we log; DeepSpeed stays quiet
    }
    if config.run.precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "run.precision=fp16 with dist.engine=deepspeed needs CUDA (DeepSpeed's CPU accelerator has "
                "no fp16): use run.precision=bf16 or fp32 on CPU, or dist.engine=ddp"
            )
        merged["fp16"] = {"enabled": True, "auto_cast": True, **user.get("fp16", {})}
    return merged


def _import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the accelerator made explicit (its auto-detection warns on CPU)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "dist.engine=deepspeed: DeepSpeed is not installed (pip install 'damformer[deepspeed]')"
        ) from None
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], device: torch.device
) -> Any:
    """``deepspeed.initialize`` on our model and optimiser; returns the engine (process group already up)."""
    deepspeed = _import_deepspeed(device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def loss_scale(engine: Any) -> float | None:
    """The fp16 dynamic loss scale, or None when the engine does not scale."""
    if not engine.fp16_enabled():
        return None
    return float(engine.optimizer.loss_scale)


# -- checkpoints ----------------------------------------------------------------------------------


def new_tag(iteration: int) -> str:
    """A fresh folder name per save, so a save never overwrites the shards the last checkpoint names."""
    return f"iter{iteration:08d}-{time.time_ns():x}"


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in ``folder`` (the shards of one DeepSpeed checkpoint)."""
    digests = {}
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def verify_shards(root: Path, record: dict[str, Any], *, where: Path) -> Path:
    """The tag folder named by a checkpoint, after checking each shard against its SHA-256."""
    folder = root / record["tag"]
    if not folder.is_dir():
        raise CheckpointError(f"{where}: its DeepSpeed shards {folder} are missing")
    found = file_digests(folder)
    for name, expected in record["files"].items():
        if name not in found:
            raise CheckpointError(f"{where}: DeepSpeed shard {folder / name} is missing")
        if found[name] != expected:
            raise CheckpointError(
                f"{where}: DeepSpeed shard {folder / name} does not match its checksum (altered or "
                "half-written): resume from another run.output_dir or start again"
            )
    return folder


def remove_other_tags(root: Path, keep: str) -> None:
    """Delete the shards of earlier checkpoints (after the new one is committed)."""
    for folder in root.iterdir():
        if folder.is_dir() and folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


class DeepSpeedStrategy(Strategy):
    """ZeRO-1/2 around our AdamW: DeepSpeed owns backward (its fp16 loss scale) and the step.

    On one process too (a process group of one, created here): the same engine and checkpoint format
    whatever the number of GPUs, so a test on one GPU exercises DeepSpeed, not a fallback.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, config: RunConfig, **kwargs: Any) -> None:
        kwargs["scaler"] = None  # fp16: DeepSpeed's own dynamic loss scaler
        super().__init__(model, config, **kwargs)
        self._own_group = False
        if not self.dist.enabled:  # DeepSpeed needs a process group, even of one
            import torch.distributed as torch_dist

            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it, launcher or not
            self._own_group = True
        ds_config = deepspeed_config(config, self.dist.world_size, self.device)
        self.engine = initialize(model, self.optimizer, ds_config, self.device)
        log.info("DeepSpeed ZeRO stage %d", ds_config["zero_optimization"]["stage"])

    @property
    def forward(self) -> torch.nn.Module:  # noqa: D102
        return self.engine

    @property
    def backward(self) -> Callable[[torch.Tensor], None]:  # noqa: D102
        engine = self.engine  # accumulates locally (and scales fp16 losses); reduces in step()
        return lambda loss: engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> dict[str, torch.Tensor]:
        """DeepSpeed reduces the accumulated gradients, clips, steps (or skips on fp16 overflow)."""
        skipped = self.engine.skipped_steps
        self.engine.step()
        metrics: dict[str, torch.Tensor] = {}
        if self.engine.fp16_enabled():  # DeepSpeed reads these on the host anyway
            metrics["overflow"] = torch.tensor(float(self.engine.skipped_steps > skipped), device=self.device)
            metrics["loss_scale"] = torch.tensor(float(loss_scale(self.engine) or 1.0), device=self.device)
        norm = self.engine.get_global_grad_norm()
        if self.config.optim.grad_clip is not None and norm is not None:
            metrics["grad_norm"] = torch.tensor(float(norm), device=self.device)
        return metrics

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"optimizer": None, "scaler": None}  # in the shards (save_shards)

    def load_state_dict(self, state: dict[str, Any], *, where: Path, output_dir: Path) -> None:  # noqa: D102
        root = output_dir / DEEPSPEED_DIR
        folder = verify_shards(root, state[DEEPSPEED_RECORD], where=where)
        self.engine.load_checkpoint(
            str(root), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )

    def refuse_resume(self, engine: str, world_size: int) -> str | None:  # noqa: D102
        if engine != "deepspeed":
            return (
                f"written with dist.engine={engine}, resumed with deepspeed: the optimiser state is stored "
                "differently; resume with the same engine"
            )
        saved = world_size
        if saved == self.dist.world_size:
            return None
        return (
            f"its DeepSpeed ZeRO shards partition the optimiser state over {saved} process(es); resuming "
            f"on {self.dist.world_size} would need DeepSpeed's universal checkpoint conversion, which "
            f"damformer does not do: resume with {saved} processes, or with dist.engine=ddp from a new run"
        )

    def save_shards(self, output_dir: Path, iteration: int) -> dict[str, Any] | None:
        """Every rank writes its shard into a fresh folder (collective).

        checkpoint.pt, renamed into place after all of them, names that folder with checksums: the commit
        point.
        """
        root = output_dir / DEEPSPEED_DIR
        tag = gather_objects(self.dist, new_tag(iteration))[0]
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        barrier(self.dist)
        return {"tag": tag, "files": file_digests(root / tag)} if self.dist.is_main else None

    def after_save(self, output_dir: Path, record: dict[str, Any] | None) -> None:  # noqa: D102
        if record is not None:
            remove_other_tags(output_dir / DEEPSPEED_DIR, keep=record["tag"])

    def close(self) -> None:  # noqa: D102
        if self._own_group:
            import torch.distributed as torch_dist

            torch_dist.destroy_process_group()
            self._own_group = False


def build_ops() -> float:
    """Compile (or load from $TORCH_EXTENSIONS_DIR) the CPU shared-memory comm op; seconds taken.

    DeepSpeed JIT-compiles it the first time a process group starts on CPU (30-35 s with g++ and
    ninja); doing it once up front keeps that cost out of every test and every rank.
    """
    started = time.perf_counter()
    _import_deepspeed(torch.device("cpu"))
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return time.perf_counter() - started


if __name__ == "__main__":  # python -m damformer.engine.strategies.deepspeed: the one-time op build
    seconds = build_ops()
    print(
        f"DeepSpeed CPU comm op ready in {seconds:.1f} s "
        f"(cache: {os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache/torch_extensions')})"
    )
