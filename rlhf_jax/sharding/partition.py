"""Sharding of model state, optimizer state and batches over a mesh.

- `state_shardings(tree, mesh)`: for a tree holding `nnx.Variable`s (an `nnx.State`, a model,
  an optimizer state built from an `nnx.State`), the same tree with each Variable's value
  replaced by the `NamedSharding` its logical names give; plain arrays are replicated. Use it
  for `jax.jit(in_shardings=..., out_shardings=...)` and `jax.device_put`.
- `shard_model(model, mesh)`: places a model's state on the mesh, in place.
- `optimizer_state_shardings(opt_state, mesh)`: the optimizer state follows the parameters.
  optax states built by `tx.init(nnx.state(model, nnx.Param))` (and `nnx.Optimizer`) keep each
  parameter's Variable (and so its logical names) around the moments; scalars such as the step
  count are replicated.
- `batch_sharding(mesh)`, `shard_batch(batch, mesh)`: batches split over `("data", "fsdp")` on
  their leading axis (per-host arrays on multi-host runs).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.sharding.rules import LOGICAL_AXIS_RULES, logical_to_mesh_sharding

BATCH_AXES = ("data", "fsdp")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh, *, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """The `NamedSharding` of one Variable from its `out_sharding` logical names."""
    names = var.get_metadata().get("out_sharding")
    value = var.get_value() if hasattr(var, "get_value") else var.value
    shape = getattr(value, "shape", ())
    if names is None or len(shape) == 0:
        return NamedSharding(mesh, PartitionSpec())
    return logical_to_mesh_sharding(names, mesh, shape=shape, rules=rules)


def state_shardings(tree: Any, mesh: jax.sharding.Mesh, *, rules=LOGICAL_AXIS_RULES) -> Any:
    """`tree` with every Variable's value (or plain array) replaced by its `NamedSharding`."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf(x):
        if _is_variable(x):
            return x.replace(variable_sharding(x, mesh, rules=rules))
        if hasattr(x, "shape"):
            return replicated
        return x

    return jax.tree.map(leaf, tree, is_leaf=_is_variable)


def optimizer_state_shardings(opt_state: Any, mesh: jax.sharding.Mesh, *,
                              rules=LOGICAL_AXIS_RULES) -> Any:
    """Shardings for an optax state whose parameter-shaped leaves sit in `nnx.Variable`s.

    The moments of each parameter get that parameter's sharding; other leaves (counts, scalars)
    are replicated.
    """
    return state_shardings(opt_state, mesh, rules=rules)


def shard_state(tree: Any, mesh: jax.sharding.Mesh, *, rules=LOGICAL_AXIS_RULES) -> Any:
    """`jax.device_put(tree, state_shardings(tree, mesh))`."""
    return jax.device_put(tree, state_shardings(tree, mesh, rules=rules))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, *, rules=LOGICAL_AXIS_RULES):
    """Places `model`'s state on `mesh` by its logical axis names (in place); returns it."""
    state = nnx.state(model)
    nnx.update(model, shard_state(state, mesh, rules=rules))
    return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis over `("data", "fsdp")`, the other `ndim - 1` axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a batch (a pytree of per-host NumPy/JAX arrays `[B_local, ...]`) on the mesh.

    The global batch is the concatenation over processes, split over `("data", "fsdp")` on the
    leading axis; that axis must be divisible by the number of batch shards per process.
    """
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    per_process = max(n // jax.process_count(), 1)

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; batches "
                             "must have a leading batch axis")
        if x.shape[0] % per_process:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading size {x.shape[0]}, not "
                f"divisible by the {per_process} batch shards (mesh axes data x fsdp) per process"
            )
        sharding = batch_sharding(mesh, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


def host_rows(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """The inverse of `shard_batch`: this process's rows of arrays split over `("data",
    "fsdp")` on their leading axis (`batch_sharding`), as NumPy arrays `[B_local, ...]`; in a
    single process, the whole arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(batch))

    def get(x):
        spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))

    return jax.tree.map(get, batch)
