"""Meshes, the logical-axis rules, and sharded forward/gradient equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    MeshConfig,
    batch_sharding,
    initialize_distributed,
    logical_to_mesh_spec,
    make_mesh,
    optimizer_state_shardings,
    shard_batch,
    shard_model,
    shard_state,
    state_shardings,
)

CONFIG = ModelConfig.tiny_llama()  # GQA: 4 query heads over 2 KV heads
MESHES = {
    "single": (MeshConfig(data=1), 1),
    "data8": (MeshConfig(data=8), 8),
    "data2_fsdp4": (MeshConfig(data=2, fsdp=4), 8),
    "data2_fsdp2_tensor2": (MeshConfig(data=2, fsdp=2, tensor=2), 8),
}


class TestMesh:
    def test_axes_and_sizes(self):
        mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
        assert mesh.axis_names == MESH_AXES
        assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
        one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
        assert one.devices.size == 1

    @pytest.mark.parametrize("config, match", [
        (MeshConfig(data=3), "needs 3 devices"),
        (MeshConfig(data=-1, fsdp=3), "does not divide"),
    ])
    def test_bad_sizes(self, config, match):
        with pytest.raises(ValueError, match=match):
            make_mesh(config)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="at most one"):
            MeshConfig(data=-1, fsdp=-1)
        with pytest.raises(ValueError, match="tensor"):
            MeshConfig(tensor=0)

    def test_initialize_distributed_is_a_no_op_on_one_process(self, monkeypatch):
        monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
        assert initialize_distributed() is False
        assert jax.process_count() == 1

    def test_initialize_distributed_on_a_multihost_tpu_slice(self, monkeypatch):
        calls = []
        monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
        monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
        monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
        assert initialize_distributed() is True
        assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]
        assert initialize_distributed(coordinator_address="10.0.0.1:1234", num_processes=2,
                                      process_id=1) is True
        assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=2,
                                 process_id=1)


class TestRules:
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

    def test_by_hand(self):
        spec = logical_to_mesh_spec
        assert spec(("embed", "mlp"), self.mesh) == PartitionSpec("fsdp", "tensor")
        assert spec(("layers", "embed", "heads", "head_dim"), self.mesh) == \
            PartitionSpec(None, "fsdp", "tensor", None)
        assert spec(("batch", "length"), self.mesh) == PartitionSpec(("data", "fsdp"), None)
        assert spec(None, self.mesh) == PartitionSpec()

    def test_indivisible_dimensions_are_replicated(self):
        assert logical_to_mesh_spec(("embed", "kv_heads"), self.mesh, shape=(64, 3)) == \
            PartitionSpec("fsdp", None)
        # A mesh axis is used once per array.
        assert logical_to_mesh_spec(("heads", "mlp"), self.mesh) == \
            PartitionSpec("tensor", None)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="no sharding rule"):
            logical_to_mesh_spec(("embedding",), self.mesh)

    def test_every_model_axis_has_a_rule(self):
        model = nnx.eval_shape(lambda: CausalLM(CONFIG, rngs=nnx.Rngs(0)))
        known = {name for name, _ in LOGICAL_AXIS_RULES} | {None}
        for _, var in nnx.to_flat_state(nnx.state(model)):
            names = var.get_metadata()["out_sharding"]
            assert set(names) <= known and len(names) == len(var.shape)


def _loss(logits):
    return jnp.mean(jnp.square(logits)) + jnp.mean(jax.nn.log_softmax(logits)[..., 3])


@pytest.fixture(scope="module")
def setup():
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, size=(8, 12)).astype(np.int32)
    mask = np.ones((8, 12), np.int32)
    mask[::2, :3] = 0

    def fwd_grad(state, ids, mask):
        def loss(s):
            logits = nnx.merge(graphdef, s)(ids, mask)
            return _loss(logits), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return value, logits, grads

    reference = jax.jit(fwd_grad)(state, ids, mask)
    return graphdef, state, ids, mask, fwd_grad, reference


@pytest.mark.parametrize("name", sorted(MESHES))
def test_forward_and_gradient_equal_one_device(setup, name):
    graphdef, state, ids, mask, fwd_grad, (ref_value, ref_logits, ref_grads) = setup
    config, n = MESHES[name]
    mesh = make_mesh(config, devices=jax.devices()[:n])
    sharded = shard_state(state, mesh)
    shardings = state_shardings(state, mesh)
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    step = jax.jit(fwd_grad,
                   in_shardings=(shardings, batch_sharding(mesh, 2), batch_sharding(mesh, 2)),
                   out_shardings=(NamedSharding(mesh, PartitionSpec()),
                                  batch_sharding(mesh, 3), shardings))
    value, logits, grads = step(sharded, batch["ids"], batch["mask"])
    np.testing.assert_allclose(value, ref_value, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5)
    if name == "data2_fsdp2_tensor2":
        q = grads["backbone"]["layers"]["attn"]["q"]["kernel"][...]
        assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)


def _bytes_on_device0(model_state):
    total = 0
    for x in jax.tree.leaves(model_state):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == jax.devices()[0])
    return total


def test_per_device_parameter_bytes_shrink_with_fsdp_and_tensor(setup):
    _, state, *_ = setup
    sizes = {}
    for config in [MeshConfig(data=8), MeshConfig(data=4, fsdp=2), MeshConfig(data=2, fsdp=4),
                   MeshConfig(fsdp=8), MeshConfig(data=2, fsdp=2, tensor=2),
                   MeshConfig(data=1, fsdp=4, tensor=2)]:
        mesh = make_mesh(config)
        sizes[tuple(mesh.shape[a] for a in MESH_AXES)] = _bytes_on_device0(
            shard_state(state, mesh))
    full = sum(x.nbytes for x in jax.tree.leaves(state))
    assert sizes[(8, 1, 1)] == full
    assert full > sizes[(4, 2, 1)] > sizes[(2, 4, 1)] > sizes[(1, 8, 1)]
    assert sizes[(2, 2, 2)] < sizes[(4, 2, 1)]
    assert sizes[(1, 4, 2)] < sizes[(2, 4, 1)]


def test_optimizer_state_follows_parameters(setup):
    graphdef, state, ids, mask, fwd_grad, (_, _, ref_grads) = setup
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shard_model(nnx.merge(graphdef, state), mesh)
    params = nnx.state(model, nnx.Param)
    tx = optax.adam(1e-2)
    opt_sh = optimizer_state_shardings(jax.eval_shape(tx.init, params), mesh)
    param_sh = state_shardings(params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    mu = opt_state[0].mu
    for m, p in zip(jax.tree.leaves(mu), jax.tree.leaves(param_sh)):
        assert m.sharding == p
    assert opt_state[0].count.sharding.spec == PartitionSpec()

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = jax.device_put(ref_grads, param_sh)  # every variable of a CausalLM is a Param
    new_params, new_opt = jax.jit(update, in_shardings=(param_sh, opt_sh, param_sh),
                                  out_shardings=(param_sh, opt_sh))(grads, opt_state, params)
    single_params, _ = update(jax.device_get(ref_grads), tx.init(jax.device_get(params)),
                              jax.device_get(params))
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # nnx.Optimizer keeps each parameter's logical names on its moments as well.
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt_specs = jax.tree.leaves(state_shardings(nnx.state(optimizer), mesh))
    assert NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor", None)) in opt_specs


class TestBatch:
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

    def test_leading_axis_over_data_and_fsdp(self):
        batch = shard_batch({"x": np.arange(24).reshape(8, 3), "y": np.arange(8)}, self.mesh)
        assert batch["x"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
        assert batch["y"].sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(batch["x"], np.arange(24).reshape(8, 3))
        assert len(batch["x"].addressable_shards[0].data) == 2

    def test_indivisible_batch_is_named(self):
        with pytest.raises(ValueError, match=r"\['x'\].*leading size 6.*4 batch shards"):
            shard_batch({"x": np.zeros((6, 2))}, self.mesh)
        with pytest.raises(ValueError, match="scalar"):
            shard_batch({"s": np.float32(1.0)}, self.mesh)
