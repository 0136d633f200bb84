"""The Cloud Storage emulator the `gs://` tests run against: epath and orbax reach it."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def test_epath_reads_and_writes_the_emulated_bucket(gcs_bucket):
    path = epath.Path(gcs_bucket) / "runs" / "a" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("seed: 3\n")
    assert path.read_text() == "seed: 3\n"
    assert [p.name for p in (epath.Path(gcs_bucket) / "runs").iterdir()] == ["a"]


def test_orbax_saves_and_restores_on_the_emulated_bucket(gcs_bucket):
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    with ocp.CheckpointManager(f"{gcs_bucket}/checkpoints") as manager:
        manager.save(7, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
        assert manager.all_steps() == [7]
        restored = manager.restore(7, args=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert (epath.Path(gcs_bucket) / "checkpoints" / "7").exists()
