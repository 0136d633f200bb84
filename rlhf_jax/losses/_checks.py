"""Argument validation shared by the loss modules (trace-time, named errors)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import chex
import jax.numpy as jnp


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


def as_mask(mask: chex.Array) -> chex.Array:
    """A float32 0/1 mask from a bool or float mask."""
    return jnp.asarray(mask, jnp.float32)
