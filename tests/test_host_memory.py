"""`keep_freed_memory`: glibc's allocator keeps freed memory (fewer page faults per step);
`release_freed_memory`: it hands the free heap back (the train loop does after compiling)."""

import resource
import sys
from typing import NamedTuple

import numpy as np
import pytest

from rlhf_jax.host_memory import keep_freed_memory, release_freed_memory
from rlhf_jax.train import loop


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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_freed_memory_returns_free_heap_pages_to_the_kernel():
    """~200 MB freed in 64 KB heap blocks below a block still in use (so the heap's top cannot
    shrink by itself) stay resident until `release_freed_memory` hands them back; memory
    allocated after the call is usable as before."""
    blocks = [np.ones(8_000) for _ in range(3_200)]
    pin = np.ones(8_000)
    del blocks
    before = _rss()
    assert release_freed_memory() is True
    assert before - _rss() > 100 * 2**20
    again = [np.full(8_000, 2.0) for _ in range(100)]
    assert float(sum(a.sum() for a in again) + pin.sum()) == 100 * 16_000 + 8_000


def test_train_loop_releases_freed_memory_once_after_the_first_step(monkeypatch):
    """The first call of the step compiles it: the loop trims the heap right after that call,
    before the second step, and never again."""
    calls: list[str] = []

    class State(NamedTuple):
        step: np.ndarray

    def step_fn(state, batch):
        calls.append(f"step {int(state.step) + 1}")
        return State(np.asarray(int(state.step) + 1)), {"loss": np.float32(0.0)}

    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append("release") or True)
    result = loop.train_loop(step_fn, State(np.asarray(0)), iter([{}] * 3), num_steps=3)
    assert result.step == 3
    assert calls == ["step 1", "release", "step 2", "step 3"]
