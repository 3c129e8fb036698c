"""Process groups for data-parallel training: torchrun or Slurm environments, one process per device.

    torchrun --standalone --nproc_per_node=2 -m damformer train CONFIG       # one node
    srun --ntasks-per-node=4 python -m damformer train CONFIG                 # Slurm, one task per GPU

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under ``srun`` without
torchrun, SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID give the ranks, and MASTER_ADDR / MASTER_PORT
must be exported by the batch script (slurm/train.sh does). Without either, training runs on one
process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from damformer.config import ConfigError

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a rank stuck longer than this (I/O, a dead peer) aborts the job


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the data-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def enabled(self) -> bool:
        """Whether a process group is up (world size > 1)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes checkpoints and talks to the tracking server."""
        return self.rank == 0


def ranks_from_environment(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun or Slurm variables; None for a single process."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local = int(env.get("SLURM_LOCALID", 0))
        else:
            return None
    except ValueError as exc:
        raise ConfigError(f"distributed environment: a rank variable is not an integer ({exc})") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"distributed environment: rank {rank} is outside world size {world}")
    return (rank, world, local) if world > 1 else None


def init_distributed(device: torch.device, env: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group described by the environment (nccl on CUDA, gloo on CPU)."""
    ranks = ranks_from_environment(env)
    if ranks is None:
        return DistContext()
    rank, world, local = ranks
    env = os.environ if env is None else env
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise ConfigError(
                f"distributed environment: {key} is not set; launch with torchrun, or export it in the "
                "Slurm script (slurm/train.sh sets MASTER_ADDR to the first node and a free MASTER_PORT)"
            )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        listen_fd = env.get("DAMFORMER_STORE_FD") if rank == 0 else None
        if listen_fd is not None:  # damformer launch bound the store's socket to the loopback
            store = dist.TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, True, timeout=TIMEOUT,
                master_listen_fd=int(listen_fd),
            )  # fmt: skip
        else:
            store, *_ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=TIMEOUT))
        prefix = _restart_prefix(env)
        if prefix is not None:
            store = dist.PrefixStore(prefix, store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    log.debug("rank %d of %d (local %d) joined the %s process group", rank, world, local, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def _restart_prefix(env: Mapping[str, str]) -> str | None:
    """A store prefix of this torchrun restart, when the workers share the agent's store.

    torchrun keeps one TCP store for the whole job and the workers of every restart connect to it
    without a prefix, so a restarted rank can read the gloo address a dead rank of the previous
    attempt published and wait on it ("connectFullMesh failed ... Connection refused", or a hang).
    On one node every worker sees the same TORCHELASTIC_RESTART_COUNT, which keys them apart. Across
    nodes the counts may differ, so the launchers (launch/multinode.sh, slurm/train.sh) set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead: a fresh store per attempt.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            log.warning(
                "torchrun restarts across nodes share one store: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "before torchrun so a restarted job cannot pick up a dead rank's address "
                "(launch/multinode.sh and slurm/train.sh do)"
            )
        return None
    return f"damformer/restart{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def teardown(context: DistContext, *, wait: bool = True) -> None:
    """Leave the process group (without it some runs abort at exit); ``wait`` for the other ranks first."""
    if context.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if context.enabled:
        dist.barrier()


def mean_over_ranks(context: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (any shape) over the ranks, in one collective (on one process: ``values``)."""
    if not context.enabled:
        return values
    reduced = _on_backend(context, values.detach().clone())
    dist.all_reduce(reduced)
    return reduced / context.world_size


def _on_backend(context: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the process group's collectives expect it (nccl: the current GPU)."""
    return tensor.cuda() if context.backend == "nccl" else tensor


def sum_over_ranks(context: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the ranks (confusion matrices), returned on its original device."""
    if not context.enabled:
        return tensor
    reduced = tensor.detach().to(torch.float64 if tensor.is_floating_point() else torch.int64).clone()
    reduced = _on_backend(context, reduced)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device, tensor.dtype)


def gather_objects(context: DistContext, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (picklable objects: RNG states, stream cursors)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(context: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not context.enabled:
        return flag
    tensor = _on_backend(context, torch.tensor([int(flag)]))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistContext]:
    """Join the process group (when launched on several processes) for one command, and always leave it.

    A failed rank leaves at once (its peers may be gone); a successful one waits for the others. What
    still refers to a gloo group when the interpreter shuts down can abort the rank at exit ("terminate
    called without an active exception"), so the command's objects are collected before the group goes.
    """
    context = init_distributed(device)
    try:
        yield context
    except BaseException:
        teardown(context, wait=False)
        raise
    gc.collect()
    teardown(context)
