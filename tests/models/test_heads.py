"""ValueModel and RewardModel: shapes, last-token reading, normalisation, initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import CausalLM, ModelConfig, RewardModel, ValueModel, last_token_index

CONFIG = ModelConfig.tiny_llama()


@pytest.fixture(scope="module")
def lm():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, CONFIG.vocab_size, size=(3, 7)), jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]])
    return ids, mask


def _backbone_leaves(model):
    return jax.tree.leaves(nnx.state(model.backbone, nnx.Param))


def test_last_token_index_by_hand():
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [1, 2, 2, 0])


@pytest.fixture(scope="module")
def rm(lm):
    return RewardModel.from_causal_lm(lm, head_names=("helpful", "harmless"), rngs=nnx.Rngs(1))


class TestRewardModel:
    def test_reads_the_last_real_token(self, rm, batch, run):
        ids, mask = batch
        rewards = run(rm, ids, mask)
        scores = run(rm, ids, mask, method="token_scores")
        assert rewards.shape == (3, 2) and scores.shape == (3, 7, 2)
        assert rewards.dtype == jnp.float32
        np.testing.assert_allclose(rewards, scores[np.arange(3), [4, 6, 1]], atol=1e-6)
        # Right padding does not change the reward: equal to the unpadded sequence.
        np.testing.assert_allclose(rewards[2], run(rm, ids[2:, :2])[0], atol=1e-5)

    def test_normalisation(self, rm, batch, run):
        ids, mask = batch
        raw = run(rm, ids, mask)
        rm.set_normalization(jnp.array([2.0, -1.0]), jnp.array([0.5, 3.0]))
        try:
            np.testing.assert_allclose(run(rm, ids, mask),
                                       raw * np.array([2.0, -1.0]) + np.array([0.5, 3.0]),
                                       rtol=1e-6)
            trainable = nnx.to_flat_state(nnx.state(rm, nnx.Param))
            assert not [p for p, _ in trainable if "norm_gain" in p or "norm_bias" in p]
        finally:
            rm.set_normalization(1.0, 0.0)

    def test_backbone_is_copied_from_the_lm(self, rm, lm):
        for a, b in zip(_backbone_leaves(rm), _backbone_leaves(lm)):
            np.testing.assert_array_equal(a, b)
        assert rm.backbone is not lm.backbone

    def test_value_model_from_reward_model(self, rm, batch, run):
        ids, mask = batch
        rm.set_normalization(jnp.array([2.0, 0.5]), jnp.array([0.1, -0.2]))
        try:
            vm = ValueModel.from_reward_model(rm, head="harmless")
            values = run(vm, ids, mask)
            rewards = run(rm, ids, mask)
        finally:
            rm.set_normalization(1.0, 0.0)
        assert values.shape == (3, 7)
        np.testing.assert_allclose(values[np.arange(3), [4, 6, 1]], rewards[:, 1], atol=1e-5)

    def test_bad_head_names(self, rm):
        with pytest.raises(ValueError, match="head_names"):
            RewardModel(CONFIG, head_names=("a", "a"), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="helpful"):
            ValueModel.from_reward_model(rm, head="honest")

    def test_default_single_head(self, batch, run):
        ids, mask = batch
        rm = RewardModel(CONFIG, rngs=nnx.Rngs(2))
        assert rm.head_names == ("reward",)
        assert run(rm, ids, mask).shape == (3, 1)


class TestValueModel:
    def test_per_token_values_from_lm_backbone(self, lm, batch, run):
        ids, mask = batch
        vm = ValueModel.from_causal_lm(lm, rngs=nnx.Rngs(3))
        values = run(vm, ids, mask)
        assert values.shape == (3, 7) and values.dtype == jnp.float32
        hidden = run(lm.backbone, ids, mask)
        w = vm.value_head.kernel[...][:, 0]
        np.testing.assert_allclose(values, hidden @ w + vm.value_head.bias[...][0], atol=1e-5)
        for a, b in zip(_backbone_leaves(vm), _backbone_leaves(lm)):
            np.testing.assert_array_equal(a, b)
