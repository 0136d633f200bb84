"""Benchmarks, run as ``python -m rlhf_jax.bench <name> [options]``.

Each benchmark is a module ``rlhf_jax.bench.<name>`` with a ``main(argv) -> None`` that prints a
table and, with ``--markdown FILE``, writes it for ``docs/benchmarks.md``. Performance is measured
here, never in tests.
"""

from rlhf_jax.bench._machine import (
    cpu_model_name,
    machine_description,
    measure_matmul_peak,
    time_fn,
)

__all__ = ["cpu_model_name", "machine_description", "measure_matmul_peak", "time_fn"]
