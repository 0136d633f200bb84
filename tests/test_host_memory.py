"""`keep_freed_memory`: glibc's allocator keeps freed memory (fewer page faults per step)."""

import resource
import sys

import numpy as np
import pytest

from rlhf_jax.host_memory import keep_freed_memory


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _step() -> None:
    """Allocate, write and free ~38 MB in 96 KB heap blocks, as a training step's host buffers
    do: with glibc's defaults the freed top of the heap goes back to the kernel and the next
    step faults its ~9,400 pages in again (about 190,000 faults over 20 steps, measured)."""
    blocks = [np.ones(12_000) for _ in range(400)]
    del blocks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_heap_is_reused_without_new_page_faults():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    _step()
    before = _faults()
    for _ in range(20):
        _step()
    assert _faults() - before < 5_000
