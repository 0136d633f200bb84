"""Counting JAX compiles: `CompileCounter`, a context manager that counts what JAX traces,
lowers and compiles while it is open (through `jax.monitoring` events), by function name.

    with CompileCounter() as counter:
        run_dpo(config_a, ...)
        run_dpo(config_b, ...)
    counter.compiles["step"]   # XLA executables built for functions named "step"

An executable read back from the persistent compilation cache counts as a compile (JAX still
builds it) and as a `cache_hits`; `cache_misses` counts those the cache did not hold. Counters
nest (each open counter sees every event) and are process-wide: work on other threads counts
too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from jax import monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"

_active: list[CompileCounter] = []
_lock = threading.Lock()
_installed = False


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    for counter in list(_active):
        counter._duration(event, duration, kwargs.get("fun_name", "?"))


def _on_event(event: str, **kwargs: Any) -> None:
    for counter in list(_active):
        counter._event(event)


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_on_duration)
            monitoring.register_event_listener(_on_event)
            _installed = True


@dataclasses.dataclass
class CompileCounter:
    """Counts and times JAX's traces, lowerings and XLA compiles while open (module docstring).

    Attributes:
      traces, lowerings, compiles: `Counter` of function name -> number of jaxpr traces, MLIR
        lowerings and XLA executables built (compiled or read from the persistent cache).
      trace_s, lower_s, compile_s: seconds spent in each (compile_s includes cache reads).
      compile_s_by_name: `Counter` of function name -> compile seconds.
      cache_hits, cache_misses: persistent compilation cache lookups that found / did not find
        the executable (0 and 0 when the cache is off).
    """

    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lowerings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compiles: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    trace_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0
    compile_s_by_name: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    cache_hits: int = 0
    cache_misses: int = 0

    def __enter__(self) -> CompileCounter:
        _install()
        _active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _active.remove(self)

    def _duration(self, event: str, duration: float, name: str) -> None:
        if event == TRACE_EVENT:
            self.traces[name] += 1
            self.trace_s += duration
        elif event == LOWER_EVENT:
            self.lowerings[name] += 1
            self.lower_s += duration
        elif event == COMPILE_EVENT:
            self.compiles[name] += 1
            self.compile_s += duration
            self.compile_s_by_name[name] += duration

    def _event(self, event: str) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1
        elif event == CACHE_MISS_EVENT:
            self.cache_misses += 1

    @property
    def num_compiles(self) -> int:
        """XLA executables built (compiled or read from the persistent cache)."""
        return sum(self.compiles.values())

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict: counts, seconds, cache hits/misses and the functions that took the
        most compile time (seconds)."""
        return {
            "traces": sum(self.traces.values()),
            "compiles": self.num_compiles,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "trace_s": round(self.trace_s, 2),
            "lower_s": round(self.lower_s, 2),
            "compile_s": round(self.compile_s, 2),
            "compiles_by_name": dict(self.compiles),
            "top_compile_s": {name: round(t, 2)
                              for name, t in self.compile_s_by_name.most_common(6)},
        }


__all__ = ["CompileCounter"]
