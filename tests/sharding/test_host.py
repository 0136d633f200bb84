"""`gather_to_host` / `global_from_host`: whole global arrays between the mesh and the host (one
process here; 2 processes x 4 devices run through them in tests/multihost)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.sharding import (
    MeshConfig,
    batch_sharding,
    gather_to_host,
    global_from_host,
    make_mesh,
)


def _mesh():
    return make_mesh(MeshConfig(data=2, fsdp=4))


def test_gather_to_host_gives_the_whole_value_as_numpy():
    mesh = _mesh()
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    tree = {"rows": jax.device_put(rows, batch_sharding(mesh, 2)),
            "scalar": jax.device_put(jnp.float32(2.5), NamedSharding(mesh, PartitionSpec())),
            "host": np.ones(2, np.float32), "pair": (jnp.arange(3), 4)}
    out = gather_to_host(tree)
    assert isinstance(out["rows"], np.ndarray) and out["rows"].dtype == np.int32
    np.testing.assert_array_equal(out["rows"], rows)
    assert out["scalar"].shape == () and float(out["scalar"]) == 2.5
    np.testing.assert_array_equal(out["host"], np.ones(2))
    np.testing.assert_array_equal(out["pair"][0], np.arange(3))
    assert isinstance(out["pair"][1], np.ndarray) and int(out["pair"][1]) == 4


def test_global_from_host_places_rows_with_the_sharding():
    mesh = _mesh()
    sharding = batch_sharding(mesh)
    rows = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    out = global_from_host({"rows": rows, "scores": jnp.arange(8.0)}, sharding)
    for name, expected in (("rows", rows), ("scores", np.arange(8.0))):
        assert out[name].sharding == sharding
        assert len(out[name].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(out[name]), expected)
    # a row per device: device i holds row i
    shard = next(s for s in out["rows"].addressable_shards if s.index[0].start == 3)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[3:4])
    # a global array is resharded, the round trip is the identity
    replicated = global_from_host(out["rows"], NamedSharding(mesh, PartitionSpec()))
    assert replicated.sharding.is_fully_replicated
    np.testing.assert_array_equal(gather_to_host(replicated), rows)
