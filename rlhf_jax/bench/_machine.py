"""Machine description, timing and the measured fp32 matmul peak that MFU figures divide by."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def cpu_model_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`, as `lscpu` shows it), else `platform`'s guess."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's `/proc/cpuinfo` fields (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_description() -> str:
    """One line naming the CPU model (with its family/model numbers and AVX-512 where
    `/proc/cpuinfo` shows them: a VM often hides the marketing name), core count, memory, JAX
    version and backend devices."""
    devices = jax.devices()
    info = _cpuinfo_fields()
    cpu = cpu_model_name()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')}"
        cpu += ", AVX-512)" if "avx512f" in info.get("flags", "").split() else ")"
    memory = _memory_gib()
    return (
        f"{cpu}, {os.cpu_count()} cores visible"
        + (f", {memory:.0f} GiB" if memory else "")
        + f", jax {jax.__version__}, {len(devices)} x {devices[0].platform} device(s)"
    )


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall seconds of ``fn()``, blocking on its outputs; ``warmup`` calls are discarded."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_peak(*, size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured matmul throughput in FLOP/s for a ``size x size`` product on the default device.

    This is the denominator of the model-FLOPs utilisation figures: a practical peak for this
    machine and dtype (2 * size**3 FLOPs per product), not a datasheet number.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds = time_fn(lambda: matmul(a, b), warmup=2, repeats=repeats)
    return 2.0 * size**3 / seconds


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_matmul_peak_per_cpu_second(*, size: int = 1024, dtype=jnp.float32,
                                       repeats: int = 10) -> float:
    """Measured matmul FLOPs per CPU second (user + system, all threads) of this process: the
    denominator of the CPU-time MFU, `step FLOPs / step CPU seconds / this`. Unlike the wall
    peak it hardly moves when other processes share the cores (a descheduled thread uses no
    CPU time), so it is the steadier figure on a shared host."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    for _ in range(2):
        jax.block_until_ready(matmul(a, b))
    rates = []
    for _ in range(repeats):
        start = _cpu_seconds()
        jax.block_until_ready(matmul(a, b))
        used = _cpu_seconds() - start
        if used > 0:
            rates.append(2.0 * size**3 / used)
    return statistics.median(rates)
