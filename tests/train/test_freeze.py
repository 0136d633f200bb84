"""Freezing the bottom decoder layers (`model.freeze_layers`) and the embeddings
(`model.freeze_embeddings`): the optimizer wrapper against plain optax on the trainable rows,
then runs through the CLI (8 devices) that leave the frozen parameters bit-identical, with LoRA,
and with an exact resume."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import cli
from rlhf_jax.train import DataSpec, ModelSpec, OptimizerConfig
from rlhf_jax.train.builders import build_model, count_trainable, setup_training
from rlhf_jax.train.config import FieldError
from rlhf_jax.train.export import read_checkpoint_state
from rlhf_jax.train.optimizer import freeze_bottom_layers, is_stacked, make_optimizer
from rlhf_jax.train.sft import SFTConfig, train_sft
from rlhf_jax.train.state import create_train_state, make_train_step

TWO_LAYERS = ModelSpec(preset="tiny_gpt2", vocab_size=64, hidden_size=32, num_layers=2,
                       num_heads=2, intermediate_size=64, max_position_embeddings=64)
SFT_ARGS = ["--num-steps", "4", "--data.synthetic", "topic", "--data.batch-size", "8",
            "--data.max-length", "32", "--data.num-eval", "0", "--optimizer.learning-rate",
            "1e-2", "--optimizer.weight-decay", "0.1", "--logging.progress", "none",
            "--logging.no-tensorboard", "--model.vocab-size", "64",
            "--model.hidden-size", "32", "--model.num-layers", "2", "--model.num-heads", "2",
            "--model.intermediate-size", "64", "--model.max-position-embeddings", "64"]


def _flat(tree, prefix=()):
    """Nested dicts / lists of arrays -> {path tuple: array} (None dropped)."""
    if isinstance(tree, dict | list | tuple):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out = {}
        for k, v in items:
            out.update(_flat(v, prefix + (k,)))
        return out
    return {} if tree is None else {prefix: np.asarray(tree)}


def _initial_params(spec: ModelSpec) -> dict:
    model = build_model(spec, seed=0)
    return {tuple(str(k) for k in path) + ("value",): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class _Stacked(nnx.Module):
    """A module holding the parameters of `TestFreezeBottomLayers._params`."""

    def __init__(self, params):
        self.embed = params["embed"]
        self.kernel = params["layers"]["kernel"]
        self.bias = params["layers"]["bias"]
        self.norm = params["norm"]


class TestFreezeBottomLayers:
    def _params(self):
        """A model's shape of parameters: stacked `[2, ...]` layer kernels and vectors, and an
        embedding and a norm that are not stacked."""
        rng = np.random.default_rng(0)
        param = lambda shape, names: nnx.Param(
            jnp.asarray(rng.normal(size=shape), jnp.float32), out_sharding=names,
            eager_sharding=False)
        return nnx.State({
            "embed": param((6, 4), ("vocab", "embed")),
            "layers": {"kernel": param((2, 4, 3), ("layers", "embed", "mlp")),
                       "bias": param((2, 3), ("layers", "mlp"))},
            "norm": param((4,), ("norm",)),
        })

    def test_matches_optax_on_the_trainable_rows(self):
        params = self._params()
        grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, params)
        inner = optax.chain(optax.clip_by_global_norm(0.5),
                            optax.adamw(1e-2, weight_decay=0.3))
        tx = freeze_bottom_layers(inner, num_layers=1)
        state = jax.jit(tx.init)(params)
        # Moments exist for the trainable row only.
        mu = state.inner[1][0].mu
        for path, leaf in nnx.to_flat_state(mu):
            full = params
            for k in path:
                full = full[k]
            rows = 1 if is_stacked(leaf) else full.get_value().shape[0]
            assert leaf.get_value().shape[0] == rows, path
        updates, _ = jax.jit(tx.update)(grads, state, params)
        # The reference: plain optax on a tree of the trainable rows only.
        cut = lambda t: jax.tree.map(lambda v: v.replace(v.get_value()[1:]) if is_stacked(v)
                                     else v, t, is_leaf=lambda x: isinstance(x, nnx.Variable))
        ref_updates, _ = jax.jit(lambda g, p: inner.update(cut(g), inner.init(cut(p)), cut(p)))(
            grads, params)
        is_var = lambda x: isinstance(x, nnx.Variable)
        for u, r, p in zip(jax.tree.leaves(updates, is_leaf=is_var),
                           jax.tree.leaves(ref_updates, is_leaf=is_var),
                           jax.tree.leaves(params, is_leaf=is_var), strict=True):
            u, r = np.asarray(u.get_value()), np.asarray(r.get_value())
            if is_stacked(p):
                assert np.all(u[0] == 0) and np.all(np.signbit(u[0]))  # -0.0
                np.testing.assert_allclose(u[1:], r, rtol=1e-6, atol=1e-12)
            else:
                np.testing.assert_allclose(u, r, rtol=1e-6, atol=1e-12)
        new = jax.jit(optax.apply_updates)(params, updates)
        for a, b, p in zip(jax.tree.leaves(new, is_leaf=is_var),
                           jax.tree.leaves(params, is_leaf=is_var),
                           jax.tree.leaves(params, is_leaf=is_var), strict=True):
            if is_stacked(p):
                assert np.asarray(a.get_value())[0].tobytes() == \
                    np.asarray(b.get_value())[0].tobytes()

    def test_signed_zeros_stay_bit_identical(self):
        w = jnp.array([[0.0, -0.0, 1.5]], jnp.float32)
        var = nnx.Param(w, out_sharding=("layers", "embed"), eager_sharding=False)
        params = nnx.State({"w": var})
        tx = freeze_bottom_layers(optax.sgd(1.0), num_layers=1)
        grads = nnx.State({"w": nnx.Param(jnp.ones_like(w), out_sharding=("layers", "embed"), eager_sharding=False)})
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        assert np.asarray(new["w"].get_value()).tobytes() == np.asarray(w).tobytes()

    def test_zero_is_the_inner_transformation_and_errors(self):
        inner = optax.sgd(1.0)
        assert freeze_bottom_layers(inner, num_layers=0) is inner
        with pytest.raises(ValueError, match="num_layers must be >= 0"):
            freeze_bottom_layers(inner, num_layers=-1)
        with pytest.raises(ValueError, match="freeze_layers=3 exceeds the model's 2 layers"):
            freeze_bottom_layers(inner, num_layers=3).init(self._params())
        with pytest.raises(FieldError, match="freeze_layers"):
            ModelSpec(freeze_layers=-1)
        config = SFTConfig(model=dataclasses.replace(TWO_LAYERS, freeze_layers=3),
                           data=DataSpec(synthetic="topic", max_length=32))
        with pytest.raises(ValueError, match="model.freeze_layers=3 exceeds the model's 2"):
            train_sft(config)

    def test_grad_norm_is_the_trainable_part(self):
        """`train/grad_norm` is the norm of the gradient the optimizer uses: with the loss
        sum(w^2) the gradient is 2w, so the norm is 2 |w| over the trainable rows."""
        model = _Stacked(self._params())
        tx, _ = make_optimizer(OptimizerConfig(), 10, freeze_layers=1)
        graphdef, state = create_train_state(model, tx, seed=0)
        loss = lambda m, b, r: (sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in
                                    jax.tree.leaves(nnx.state(m, nnx.Param))), {})
        _, metrics = jax.jit(make_train_step(loss, tx, graphdef=graphdef))(state, {})
        is_var = lambda x: isinstance(x, nnx.Variable)
        want = np.sqrt(sum(
            np.sum((2.0 * np.float64(v.get_value())[1 if is_stacked(v) else 0:]) ** 2)
            for v in jax.tree.leaves(state.params, is_leaf=is_var)))
        np.testing.assert_allclose(metrics["train/grad_norm"], want, rtol=1e-5)

    def test_optimizer_state_saving_and_trainable_count(self, capsys):
        def setup(spec):
            config = SFTConfig(model=spec, optimizer=OptimizerConfig())
            return setup_training(config, build_model(spec, seed=0),
                                  lambda m, b, r: (jnp.zeros(()), {}))

        full = setup(TWO_LAYERS)
        frozen = setup(dataclasses.replace(TWO_LAYERS, freeze_layers=1, freeze_embeddings=True))
        size = lambda t: sum(x.size for x in jax.tree.leaves(t))
        full_count = count_trainable(full.state)
        count = count_trainable(frozen.state, freeze_layers=1)
        assert count.total == full_count.total == full_count.trainable
        embed = 64 * 32 + 64 * 32  # token and position embeddings
        layer = sum(int(np.prod(v.get_value().shape[1:]))
                    for v in jax.tree.leaves(full.state.params,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))
                    if is_stacked(v))
        assert count.trainable == full_count.total - embed - layer
        # Adam's two moments of exactly the frozen parameters are gone.
        assert size(full.state.opt_state) - size(frozen.state.opt_state) == 2 * (embed + layer)
        err = capsys.readouterr().err
        assert f"trainable parameters of CausalLM: {count.trainable:,} of {count.total:,}" in err


def _run_sft(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["sft", "--output-dir", str(out), *SFT_ARGS, *extra]
    assert cli.main(argv) == 0
    return out


def _params_at(out, step=None):
    _, state = read_checkpoint_state(str(out / "checkpoints"), step)
    return state, _flat(state["params"]), _flat(state["frozen"])


def test_sft_frozen_layers_bit_identical_on_8_devices(tmp_path, capsys):
    """`rlhf-jax sft --model.freeze-layers 1 --model.freeze-embeddings` on the 8-device mesh:
    layer 0 and the embeddings end bit-identical to the initial weights, layer 1 and the final
    norm change, and the checkpointed moments cover layer 1 only."""
    out = _run_sft(tmp_path, "frozen", "--model.freeze-layers", "1",
                   "--model.freeze-embeddings", "--mesh.fsdp", "4", "--mesh.data", "2")
    assert "trainable parameters of CausalLM" in capsys.readouterr().err
    init = _initial_params(TWO_LAYERS)
    state, params, frozen = _params_at(out)
    assert frozen[("backbone", "embed", "embedding", "value")].tobytes() == \
        init[("backbone", "embed", "embedding", "value")].tobytes()
    assert ("backbone", "embed", "embedding", "value") not in params
    stacked = [k for k in params if k[1] == "layers"]
    assert len(stacked) == 16
    for key in stacked:
        assert params[key][0].tobytes() == init[key][0].tobytes(), key
        assert not np.array_equal(params[key][1], init[key][1]), key
    assert not np.array_equal(params[("backbone", "final_norm", "scale", "value")],
                              init[("backbone", "final_norm", "scale", "value")])
    moments = {k: v for k, v in _flat(state["opt_state"]).items() if "layers" in k}
    assert len(moments) == 2 * 16  # mu and nu of every stacked parameter, layer 1 only
    assert all(v.shape[0] == 1 for v in moments.values())


def test_sft_frozen_layers_with_lora_and_exact_resume(tmp_path):
    """LoRA + `freeze_layers=1`: layer 0's adapters stay at their initial values, layer 1's
    train. Deleting the last checkpoint and running again resumes from the one before and ends
    with bit-identical parameters and optimizer state."""
    out = _run_sft(tmp_path, "lora", "--model.freeze-layers", "1", "--model.lora-rank", "2",
                   "--model.lora-targets", "q", "v", "--checkpoint.every-steps", "2")
    state, params, _ = _params_at(out)
    a0 = params[("backbone", "layers", "attn", "q", "lora_a", "value")]
    b = params[("backbone", "layers", "attn", "q", "lora_b", "value")]
    assert np.all(b[0] == 0) and np.any(b[1] != 0)
    init = _initial_params(dataclasses.replace(TWO_LAYERS, lora_rank=2, lora_targets=("q", "v")))
    a_init = init[("backbone", "layers", "attn", "q", "lora_a", "value")]
    assert a0[0].tobytes() == a_init[0].tobytes() and not np.array_equal(a0[1], a_init[1])
    shutil.rmtree(out / "checkpoints" / "4")
    _run_sft(tmp_path, "lora", "--model.freeze-layers", "1", "--model.lora-rank", "2",
             "--model.lora-targets", "q", "v", "--checkpoint.every-steps", "2")
    again, _, _ = _params_at(out)
    for key, value in _flat(state).items():
        assert _flat(again)[key].tobytes() == value.tobytes(), key
