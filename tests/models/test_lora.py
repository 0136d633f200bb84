"""LoRA: adapters, the trainable filter, disabling, merging and export."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import (
    CausalLM,
    LoRAParam,
    ModelConfig,
    apply_lora,
    count_params,
    from_pretrained,
    has_lora,
    lora_disabled,
    merge_lora,
    save_pretrained,
    trainable_fraction,
)

CONFIG = ModelConfig.tiny_llama()


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def call(model, ids):
    """`model(ids)` under jit (one compile per graph)."""
    graphdef, state = nnx.split(model)
    return _jit_forward(graphdef, state, ids)


IDS = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 6)), jnp.int32)


def _lora_model(targets="all", seed=0):
    model = CausalLM(CONFIG, rngs=nnx.Rngs(seed))
    base = np.asarray(call(model, IDS))
    apply_lora(model, rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(1))
    return model, base


@pytest.fixture(scope="module")
def trained():
    """A LoRA model after one optimizer step on the adapters only."""
    model, base = _lora_model()
    frozen_before = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=LoRAParam)

    def loss_fn(m):
        return jnp.mean(m(IDS)[..., 0])

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
    optimizer.update(model, grads)
    return model, base, frozen_before, grads


def test_fresh_adapters_leave_the_output_unchanged():
    model, base = _lora_model()
    assert has_lora(model)
    np.testing.assert_array_equal(np.asarray(call(model, IDS)), base)


def test_trainable_fraction_formula():
    model, _ = _lora_model(targets=("q", "v"))
    e, h, k, d, r, l_ = 64, 4, 2, 16, 4, CONFIG.num_layers
    lora = l_ * ((e * r + r * h * d) + (e * r + r * k * d))
    total_base = count_params(CausalLM(CONFIG, rngs=nnx.Rngs(0)))
    assert count_params(model, LoRAParam) == lora
    assert trainable_fraction(model) == pytest.approx(lora / (total_base + lora))
    assert model.backbone.layers.attn.q.lora_a.shape == (l_, e, r)
    assert model.backbone.layers.attn.v.lora_b.shape == (l_, r, k, d)
    assert not hasattr(model.backbone.layers.attn.k, "lora_a")


def test_only_adapters_are_trained(trained):
    model, base, frozen_before, grads = trained
    frozen_after = jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    for a, b in zip(frozen_before, frozen_after):
        np.testing.assert_array_equal(a, b)
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(
        grads, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert np.abs(np.asarray(call(model, IDS)) - base).max() > 1e-4


def test_lora_disabled_gives_the_base_model(trained):
    model, base, _, _ = trained
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(call(nnx.merge(graphdef, lora_disabled(state)), IDS)),
                                  base)
    # The adapters themselves are untouched.
    assert np.abs(np.asarray(call(model, IDS)) - base).max() > 1e-4


def test_merge_equals_adapted_model_and_exports(trained, tmp_path):
    model, _, _, _ = trained
    adapted = np.asarray(call(model, IDS))
    save_pretrained(model, tmp_path / "hf")
    assert has_lora(model)  # export merged a copy
    merged = merge_lora(nnx.clone(model))
    assert not has_lora(merged) and count_params(merged, LoRAParam) == 0
    np.testing.assert_allclose(np.asarray(call(merged, IDS)), adapted, atol=1e-5)
    loaded = from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(np.asarray(call(loaded, IDS)), adapted, atol=1e-5)


def test_bad_targets():
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="allowed"):
        apply_lora(model, rank=2, targets=("qkv",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0, rngs=nnx.Rngs(0))
    apply_lora(model, rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=2, rngs=nnx.Rngs(0))
