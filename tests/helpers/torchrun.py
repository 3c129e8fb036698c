"""Launch helpers shared by the distributed tests: torchrun command lines, a clean environment."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from damformer.runtime.artifacts import load_checkpoint

# Source only with rare class sampling (index-based draws), no dropout: two ranks with batch 1 see
# exactly the samples that one process with batch 1 and two accumulation steps sees.
EQUIVALENT = {
    "uda": {"enabled": False, "rcs": True},
    # The default decoder widths, not the tests' narrow ones: these runs are compared with one process
    # to 1e-4. Measured at iteration 4, 2 ranks against 1 process: 2e-6 with these widths, 1e-3 with
    # the narrow decoder, while 1 thread against 2 threads on one process differs by 8e-3 with either.
    # The likely cause: float noise of another summation order on a nearly-zero gradient component
    # becomes a whole Adam step (an update is m / sqrt(v), whatever the gradient's size).
    "model": {
        "arch": "unet_t",
        "temporal": False,
        "drop_path": 0.0,
        "decoder_channels": [256, 128, 64, 32, 16],
    },
    "data": {"batch_size": 1},
    "optim": {"max_iters": 4},
    "eval": {"interval": 0},
}


@contextlib.contextmanager
def one_thread():
    """Run the one-process reference with the thread count of the torchrun workers (OMP_NUM_THREADS=1).

    With another thread count, convolution backward sums in another order, and Adam turns those last-bit
    differences of near-zero gradients into whole steps: the comparison then depends on the CPU's kernels
    (it passed on one machine and failed on another). With equal threads, two ranks' averaged gradient
    (a + b is exact in either order) equals one process's accumulated gradient.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clean_env() -> dict[str, str]:
    values = dict(os.environ, OMP_NUM_THREADS="1", DAMFORMER_QUIET="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        values.pop(key, None)
    return values


def torchrun(launcher_args: list[str], overrides: list[str], *extra: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_args]
    command += ["-m", "damformer", "-q", "--log-level", "INFO", "train", "/dev/null", *extra]  # INFO: resumes
    for assignment in overrides:
        command += ["--set", assignment]
    return command


def run(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, capture_output=True, text=True, env=clean_env(), timeout=240, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def standalone(nproc: int = 2) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}"]


def is_bn_buffer(name: str) -> bool:
    """BatchNorm statistics: per rank under DDP (each rank normalises its own batch)."""
    return "running_" in name or "num_batches_tracked" in name


def student(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(checkpoint)["uda"]
    return {k: v for k, v in state.items() if k.startswith("student.") and not is_bn_buffer(k)}
