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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter numbers (`<malloc.h>`)."""

MiB = 1 << 20


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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
                         (M_TOP_PAD, top_pad)):
        ok = bool(mallopt(param, int(value))) and ok
    return ok


__all__ = ["keep_freed_memory"]
