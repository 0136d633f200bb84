"""Argument validation shared by the loss modules (trace-time, named errors).

Value checks (hyper-parameter ranges, mask values in {0, 1}, token ids in [0, V)) depend on
whether the values are known where the function is called:

- Python numbers, NumPy arrays and concrete (not traced) JAX arrays are checked on the host and
  raise `ValueError` naming the argument and the allowed range. A concrete JAX array is copied
  to the host for this (masks and ids are `[B, T]` integers, small next to `[B, T, V]` logits).
- Under `jax.jit` (traced values) nothing is checked at run time, so the jitted code is as fast
  as without checks; the checks are `checkify.debug_check`s instead, which
  `jax.experimental.checkify.checkify(f, errors=checkify.user_checks)` turns into errors with
  the same messages. Each check's error code is derived from its message (`trace_check`), so
  tracing the same function twice gives the same program, which JAX's persistent compilation
  cache can then serve.
- A traced check is an effect of the program, and JAX runs a program with effects through its
  Python dispatch path instead of the C++ one (about 0.3 ms more a call for a 30-array
  argument, more for a train state). The library's own jitted functions (train steps, samplers,
  scorers) are therefore traced without the checks: `unchecked(fn)` (or the context manager
  `traced_checks(False)`). Checkify a loss, not a library step, to check traced values.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import checkify as _checkify_impl  # the error-code counter (`trace_check`)
from jax.experimental import checkify

_CODE_LOCK = threading.Lock()
_TRACED_CHECKS = contextvars.ContextVar("rlhf_jax_traced_checks", default=True)


@contextlib.contextmanager
def traced_checks(enabled: bool):
    """Within the block, functions traced emit (`True`, the default) or omit (`False`) the
    `checkify.debug_check`s of traced values (module docstring); host checks are unchanged."""
    token = _TRACED_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _TRACED_CHECKS.reset(token)


def unchecked(fn):
    """`fn` traced without the checks of traced values (`traced_checks(False)` around each
    call): for a function that is jitted and run many times, so that its program has no
    checkify effect and runs on JAX's C++ dispatch path."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with traced_checks(False):
            return fn(*args, **kwargs)

    return wrapped


def trace_check(predicate: jax.Array, message: str) -> None:
    """`checkify.debug_check(predicate, message)` whose error code depends only on `message`.

    checkify numbers each check it traces from a process-wide counter, and the number is a
    constant of the lowered program: the same function traced twice (a jitted step built afresh
    for each run of a sweep, or each test) lowered to programs that differ in that constant, so
    JAX's persistent compilation cache never served a second trace within a process. Here the
    code is `2**30 + crc32(message) mod 2**30`, clear of the counter's small numbers; two checks
    with the same message share it (and their message). Falls back to checkify's own numbering
    on a JAX without the counter.
    """
    if not _TRACED_CHECKS.get():
        return
    counter = getattr(_checkify_impl, "next_code", None)
    if counter is None:
        checkify.debug_check(predicate, message)
        return
    code = (1 << 30) | (zlib.crc32(message.encode()) & ((1 << 30) - 1))
    with _CODE_LOCK:
        _checkify_impl.next_code = lambda: code
        try:
            checkify.debug_check(predicate, message)
        finally:
            _checkify_impl.next_code = counter


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    """Raises ValueError naming ``name`` and the allowed values if ``value`` is not allowed."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_rank(name: str, x: chex.Array, rank: int | Sequence[int]) -> None:
    """chex rank check whose message names the argument."""
    chex.assert_rank(x, rank, custom_message=f"argument `{name}` must have rank {rank}")


def check_same_shape(**arrays: chex.Array | None) -> None:
    """chex equal-shape check over the non-None keyword arrays, naming them."""
    named = {k: v for k, v in arrays.items() if v is not None}
    if len(named) > 1:
        shapes = ", ".join(f"{k}={jnp.shape(v)}" for k, v in named.items())
        chex.assert_equal_shape(
            list(named.values()), custom_message=f"arguments must have equal shapes: {shapes}"
        )


def is_static_zero(x) -> bool:
    """True for a Python number equal to 0 (a hyper-parameter known to be off at trace time);
    False for anything else, including arrays and traced values."""
    return isinstance(x, int | float) and float(x) == 0.0


def f32(x: chex.Array) -> chex.Array:
    """Casts to float32 (losses compute in float32 whatever the input dtype)."""
    return jnp.asarray(x, jnp.float32)


def is_traced(x: Any) -> bool:
    """True when `x` is a JAX tracer (its values are not known here)."""
    return isinstance(x, jax.core.Tracer)


def static_value(value) -> float | None:
    """``value`` as a Python float when it is known at trace time (a Python number or a concrete
    scalar array); ``None`` for traced values, which cannot be checked."""
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _host_values(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array, or None when its values are not available on this host (a tracer,
    or a global array with shards on other processes)."""
    if is_traced(x):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "finite"


def check_value(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    requirement: str | None = None,
) -> None:
    """Checks that the hyper-parameter `value` (a number or an array of them) is finite and in
    the interval given by `low`/`high` (open ends with `low_open`/`high_open`).

    Raises ValueError ``"<name> must be <interval>, got <value>"`` (or ``"<requirement>, got
    <value>"``) when the values are known; under a trace the check is a `checkify.debug_check`
    (see the module docstring). None passes (an unset optional argument).
    """
    if value is None:
        return

    def ok(x):
        good = jnp.isfinite(x) if is_traced(x) else np.isfinite(x)
        if low is not None:
            good = good & ((x > low) if low_open else (x >= low))
        if high is not None:
            good = good & ((x < high) if high_open else (x <= high))
        return good

    requirement = requirement or f"{name} must be {_interval(low, high, low_open, high_open)}"
    if is_traced(value):
        trace_check(jnp.all(ok(value)), requirement)
        return
    host = _host_values(value)
    if host is None:
        return
    if not (np.issubdtype(host.dtype, np.number) or np.issubdtype(host.dtype, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    good = ok(host.astype(np.float64))
    if not np.all(good):
        bad = host.reshape(-1)[np.flatnonzero(~np.reshape(good, -1))[0]].item()
        shown = host.item() if host.ndim == 0 else f"an array holding {bad!r}"
        raise ValueError(f"{requirement}, got {shown}")


def check_mask(name: str, mask: Any) -> None:
    """Checks that a float/int mask holds only 0 and 1 (a bool mask always does).

    A value such as 2 would count its token twice in every masked sum and mean; a fractional one
    would weight it. Raises ValueError naming ``name`` when the values are known; a
    `checkify.debug_check` under a trace (module docstring).
    """
    dtype = getattr(mask, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.bool_):
        return
    message = (f"{name} must hold only 0 and 1 (1 on real tokens); other values would weight "
               "tokens (a 2 counts its token twice)")
    if is_traced(mask):
        trace_check(jnp.all((mask == 0) | (mask == 1)), message)
        return
    host = _host_values(mask)
    if host is None:
        return
    bad = np.flatnonzero(np.reshape((host != 0) & (host != 1), -1))
    if bad.size:
        index = np.unravel_index(bad[0], np.shape(host))
        raise ValueError(f"{message}; got {host[index].item()!r} at index {tuple(map(int, index))}")


def check_token_ids(name: str, ids: Any, vocab_size: int) -> None:
    """Checks that integer token ids lie in ``[0, vocab_size)``.

    Raises ValueError naming ``name``, the first bad id and its index when the values are known;
    a `checkify.debug_check` under a trace (module docstring).
    """
    message = f"{name} must be token ids in [0, {vocab_size}) (V = {vocab_size})"
    if is_traced(ids):
        trace_check(jnp.all((ids >= 0) & (ids < vocab_size)), message)
        return
    host = _host_values(ids)
    if host is None:
        return
    bad = np.flatnonzero(np.reshape((host < 0) | (host >= vocab_size), -1))
    if bad.size:
        index = np.unravel_index(bad[0], np.shape(host))
        raise ValueError(f"{message}; got {int(host[index])} at index "
                         f"{tuple(map(int, index))}")


def as_mask(mask: chex.Array, name: str = "mask") -> chex.Array:
    """A float32 0/1 mask from a bool or float mask, after `check_mask`."""
    check_mask(name, mask)
    return jnp.asarray(mask, jnp.float32)
