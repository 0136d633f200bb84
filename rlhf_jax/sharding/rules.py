"""Logical axis names -> mesh axes: the one rules table of the project.

Model parameters are annotated with logical names (`out_sharding` metadata on each
`nnx.Variable`, set in `rlhf_jax.models.layers`). `LOGICAL_AXIS_RULES` maps each name to a mesh
axis (or a tuple of axes, or None = replicated):

| logical      | mesh       | used by                                     |
|--------------|------------|---------------------------------------------|
| `batch`      | data, fsdp | leading axis of batches and activations     |
| `embed`      | fsdp       | the residual width E of every weight        |
| `vocab`      | tensor     | token embedding / LM head                   |
| `heads`      | tensor     | query heads                                 |
| `kv_heads`   | tensor     | key/value heads                             |
| `mlp`        | tensor     | MLP width F                                 |
| `head_dim`, `layers`, `norm`, `lora_rank`, `reward_heads`, `length` | replicated |

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 2 KV heads
on a tensor axis of 4), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("reward_heads", None),
    ("length", None),
)


def _lookup(name, rules):
    if name is None:
        return None
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    known = tuple(r[0] for r in rules)
    raise ValueError(f"logical axis {name!r} has no sharding rule; known names: {known}")


def logical_to_mesh_spec(
    logical_names: Sequence[str | None] | None,
    mesh: jax.sharding.Mesh,
    *,
    shape: Sequence[int] | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The `PartitionSpec` for an array with `logical_names` (one per dimension).

    With `shape`, mesh axes that do not divide a dimension are dropped (replicated).
    """
    if logical_names is None:
        return PartitionSpec()
    if shape is not None and len(shape) != len(logical_names):
        raise ValueError(f"logical names {tuple(logical_names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_names):
        axes = _lookup(name, rules)
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        size = 1
        for axis in axes:
            if axis in used or axis not in mesh.shape:
                continue
            n = mesh.shape[axis]
            if shape is not None and shape[dim] % (size * n):
                continue
            kept.append(axis)
            size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_to_mesh_sharding(
    logical_names: Sequence[str | None] | None,
    mesh: jax.sharding.Mesh,
    *,
    shape: Sequence[int] | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """`NamedSharding(mesh, logical_to_mesh_spec(...))`."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical_names, mesh, shape=shape,
                                                    rules=rules))
