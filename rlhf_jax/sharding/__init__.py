"""Meshes, logical-axis partitioning and placement of model state, optimizer state and batches.

Mesh axes are always `("data", "fsdp", "tensor")`, any of size 1 (`MeshConfig`, `make_mesh`).
Model parameters carry logical axis names (`"embed"`, `"vocab"`, `"heads"`, `"kv_heads"`,
`"mlp"`, ...); the one table `LOGICAL_AXIS_RULES` maps them to mesh axes. Batches are split over
`("data", "fsdp")` on their leading axis. `gather_to_host` / `global_from_host` move whole global
arrays between the devices and every host (on any number of processes).

Typical use::

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    model = shard_model(CausalLM(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    step = jax.jit(fn, in_shardings=(state_shardings(state, mesh), batch_sharding(mesh, 2)))
    logits = step(state, shard_batch(batch, mesh))
"""

from rlhf_jax.sharding.host import gather_to_host, global_from_host
from rlhf_jax.sharding.mesh import (
    MESH_AXES,
    MeshConfig,
    initialize_distributed,
    make_mesh,
    sync_processes,
)
from rlhf_jax.sharding.partition import (
    BATCH_AXES,
    batch_sharding,
    host_rows,
    optimizer_state_shardings,
    shard_batch,
    shard_model,
    shard_state,
    state_shardings,
    variable_sharding,
)
from rlhf_jax.sharding.rules import (
    LOGICAL_AXIS_RULES,
    logical_to_mesh_sharding,
    logical_to_mesh_spec,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "gather_to_host",
    "global_from_host",
    "host_rows",
    "initialize_distributed",
    "logical_to_mesh_sharding",
    "logical_to_mesh_spec",
    "make_mesh",
    "optimizer_state_shardings",
    "shard_batch",
    "shard_model",
    "shard_state",
    "sync_processes",
    "state_shardings",
    "variable_sharding",
]
