"""The host allocator's settings for a long-running training process (glibc `mallopt`).

By default glibc's `malloc` hands large freed blocks back to the kernel (`munmap`, and heap
trimming once the free top of the heap exceeds `M_TRIM_THRESHOLD`), so a process that allocates
and frees the same few megabytes every step (XLA's CPU buffers, the host copies of a batch or of
metrics) takes fresh pages from the kernel, one page fault each, every step. Measured on the CPU
demo (`experiments/demo.py`, default preset): 11.2 million minor page faults and 10 s of
system time with the defaults; 3.3-4.4 million and about 4 s with `keep_freed_memory()` called
at start-up (allocations made before the call still follow the defaults), user time unchanged
or lower, and the same results bit for bit (the allocator's policy changes where
memory comes from, not what is computed).

`keep_freed_memory()` raises the thresholds so freed memory stays in the process for reuse: the
resident set stays at its high-water mark (the demo's peak RSS was unchanged, about 1.1 GB).

`release_freed_memory()` does the opposite, once: glibc's `malloc_trim(0)` hands every free page
of every arena back to the kernel. XLA's compiler allocates and frees hundreds of megabytes
while it compiles a train step, in many small blocks spread over the heaps of its threads; glibc
keeps them (only the free top of the main heap is ever trimmed by itself), so without a trim
they stay resident beside the step's own buffers for the rest of the run. The train loop calls
it once after its first step has been compiled (`rlhf_jax.train.loop.train_loop`), the GRPO /
RLOO trainer between each iteration's scoring and update (`rlhf_jax.train.grpo`), and the
benchmark's step worker after compiling. It does not change `keep_freed_memory()`'s
settings: memory freed after the call is kept for reuse again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter numbers (`<malloc.h>`)."""

MiB = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None on other platforms and C libraries; looked up once (`find_library` runs
    `ldconfig`), since the GRPO trainer releases memory every iteration."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(*, mmap_threshold: int = 32 * MiB, trim_threshold: int = 256 * MiB,
                      top_pad: int = 64 * MiB) -> bool:
    """Sets glibc's allocator to keep freed memory for reuse (module docstring); returns
    whether it did (False on other platforms or C libraries: nothing changes there).

    Args:
      mmap_threshold: blocks at least this large are mapped on their own (glibc's maximum,
        32 MiB on 64-bit; fixing it also stops glibc's dynamic adjustment).
      trim_threshold: the free top of the heap is returned to the kernel only past this size.
      top_pad: extra bytes the heap grows by whenever it grows.

    Equivalent to starting the process with `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`
    and `MALLOC_TOP_PAD_` set; it affects the whole process from the call on.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
                         (M_TOP_PAD, top_pad)):
        ok = bool(mallopt(param, int(value))) and ok
    return ok


def release_freed_memory() -> bool:
    """Returns the free memory of glibc's heaps to the kernel (`malloc_trim(0)`; module
    docstring); returns whether it ran (False on other platforms or C libraries: nothing happens
    there).

    Call it after a large compilation (or any phase that freed much memory) and before the
    memory-hungry work that follows: it lowers the resident set, and so the peak, by what the
    allocator held free. It costs the time to walk the heaps (milliseconds) and one page fault
    per page that is used again later. Safe to call from any thread at any time.
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


__all__ = ["keep_freed_memory", "release_freed_memory"]
