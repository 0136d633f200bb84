"""Range checks of scalar hyper-parameters, raised at trace time with the argument's name."""

from __future__ import annotations

import numbers

import jax


def static_value(value) -> float | None:
    """``value`` as a Python float when it is known at trace time (a Python number or a concrete
    scalar array); ``None`` for traced values, which cannot be checked."""
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_range(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError naming ``name`` unless ``low (<|<=) value (<|<=) high``.

    Bounds left as ``None`` are not checked; NaN always fails. Traced values are not checked
    (their range is the caller's contract).
    """
    v = static_value(value)
    if v is None:
        return
    ok = v == v  # NaN fails
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        left = "" if low is None else f"{low} {'<' if low_open else '<='} "
        right = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must satisfy {left}{name}{right}, got {value!r}")
