"""Shared helpers for the model tests: jitted calls (one compile per graph and shape)."""

import functools

import jax
import pytest
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(graphdef, method, state, args, kwargs):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(*args, **kwargs)


def call(model, *args, method="__call__", **kwargs):
    """`getattr(model, method)(*args, **kwargs)` under `jax.jit`."""
    graphdef, state = nnx.split(model)
    return _call(graphdef, method, state, args, kwargs)


@pytest.fixture(scope="session")
def run():
    return call
