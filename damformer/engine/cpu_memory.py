"""Keep freed CPU memory for reuse, so big tensors stop paying page faults at every training step.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
hands it back to the kernel on ``free``. A training step allocates and frees the same big activations
again and again, so on CPU each step page-faults and zero-fills them anew. Measured on the U-TAE
benchmark (batch 4, T = 24 dates, 40 x 40 crops): 329,000 minor faults and 0.68 s of kernel time per
1.2 s step; T = 6 stays under the threshold and barely faults, which made the step time grow faster
than the number of dates. With freed memory kept for reuse: about 1,000 faults per step and the step
time grows linearly. A DAM-Former (MiT-b0) UDA iteration at 512 px, batch 2 + 2: 3.2 s instead of 4.1 s
(benchmarks/RESULTS.md).

The cost: the resident memory stays at its peak instead of shrinking between steps (a training process
returns to that peak at every step anyway), and the peak itself rises a little from fragmentation:
2034 instead of 1957 MiB (+4%) on that UDA iteration. Users who preload another allocator (jemalloc,
tcmalloc) or set ``MALLOC_*`` variables keep their choice; ``DAMFORMER_CPU_ALLOCATOR=system`` turns
this off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

OPT_OUT = "DAMFORMER_CPU_ALLOCATOR"
# mallopt(3) parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB lie free at the top of the heap

_applied = False


def _user_tuned_allocator() -> str | None:
    """What says the user already chose their allocator's behaviour, if anything."""
    if os.environ.get(OPT_OUT, "").lower() == "system":
        return f"{OPT_OUT}=system"
    tuned = sorted(name for name in os.environ if name.startswith("MALLOC_"))
    if tuned:
        return tuned[0]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD={preload}"
    return None


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed blocks for reuse (no mmap per big block, no trimming). True if in effect.

    Idempotent; a no-op (False) off Linux/glibc or where the user chose otherwise (see the module doc).
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    reason = _user_tuned_allocator()
    if reason is not None:
        log.debug("CPU allocator left as configured (%s)", reason)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if _applied:
        log.info("CPU memory: freed blocks kept for reuse (%s=system turns this off)", OPT_OUT)
    return _applied
