"""Judge arithmetic: answer-token preferences, position debiasing, expected scores."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from rlhf_jax.rlaif import (
    answer_preference,
    debias_position,
    expected_score,
    position_bias,
    score_distribution,
    soft_to_preference_label,
)


def _np_pair_prob(logits, ids):
    logits = np.asarray(logits, np.float64)
    z = logits[:, ids]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e[:, 0] / e.sum(axis=1)


def _np_expected(logits, ids, values):
    z = np.asarray(logits, np.float64)[:, ids]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)) @ np.asarray(values, np.float64)


class ArithmeticTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.logits = rng.normal(size=(5, 17)).astype(np.float32) * 3
        self.ids = np.array([4, 9], np.int32)
        self.score_ids = np.arange(3, 13, dtype=np.int32)
        self.values = np.arange(1, 11, dtype=np.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_answer_preference_matches_reference(self):
        out = self.variant(answer_preference)(self.logits, self.ids)
        chex.assert_shape(out, (5,))
        np.testing.assert_allclose(out, _np_pair_prob(self.logits, self.ids), atol=1e-6)

    def test_answer_preference_by_hand(self):
        # logit gap log(3): P = 3 / (3 + 1). Other vocabulary entries do not matter.
        logits = np.array([[np.log(3.0), 0.0, 100.0]], np.float32)
        out = answer_preference(logits, np.array([0, 1]))
        np.testing.assert_allclose(out, [0.75], atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_debias_by_hand(self):
        # Forward 0.8 for response 1; swapped, the judge gives the first slot (response 2) 0.6.
        # P(response 1) = (0.8 + 0.4) / 2 = 0.6; first-slot bias = (0.8 + 0.6) / 2 - 0.5 = 0.2.
        pf, pr = jnp.array([0.8, 0.5]), jnp.array([0.6, 0.5])
        np.testing.assert_allclose(self.variant(debias_position)(pf, pr), [0.6, 0.5], atol=1e-7)
        np.testing.assert_allclose(self.variant(position_bias)(pf, pr), [0.2, 0.0], atol=1e-7)

    def test_constant_slot_bias_cancels(self):
        # A judge whose logit for the first slot is shifted by b in both orders: debiasing
        # recovers a preference symmetric under swapping the responses.
        rng = np.random.default_rng(1)
        gap = rng.normal(size=8)  # true logit advantage of response 1
        for bias in (0.0, 1.5, -3.0):
            pf = 1 / (1 + np.exp(-(gap + bias)))
            pr = 1 / (1 + np.exp(-(-gap + bias)))
            p = np.asarray(debias_position(jnp.asarray(pf), jnp.asarray(pr)))
            p_swapped = np.asarray(debias_position(jnp.asarray(pr), jnp.asarray(pf)))
            np.testing.assert_allclose(p + p_swapped, 1.0, atol=1e-6)
            np.testing.assert_array_equal(p > 0.5, gap > 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_expected_score_matches_reference(self):
        out = self.variant(expected_score)(self.logits, self.score_ids, self.values)
        ref = _np_expected(self.logits, self.score_ids, self.values)
        np.testing.assert_allclose(out, ref, rtol=1e-6)
        probs = self.variant(score_distribution)(self.logits, self.score_ids)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)

    def test_expected_score_by_hand(self):
        # Equal mass on scores 2 and 4, nothing else: 3.
        logits = np.full((1, 6), -1e9, np.float32)
        logits[0, [1, 3]] = 0.0
        out = expected_score(logits, np.arange(5), np.arange(1.0, 6.0))
        np.testing.assert_allclose(out, [3.0], atol=1e-6)

    def test_extreme_logits_are_finite(self):
        logits = np.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 0.0]], np.float32)
        p = answer_preference(logits, np.array([0, 1]))
        np.testing.assert_array_equal(p, [1.0, 0.0])
        s = expected_score(logits, np.array([0, 1]), np.array([1.0, 10.0]))
        np.testing.assert_allclose(s, [1.0, 10.0])

    def test_bfloat16_logits_computed_in_float32(self):
        out = answer_preference(jnp.asarray(self.logits, jnp.bfloat16), self.ids)
        assert out.dtype == jnp.float32

    def test_gradients(self):
        z0 = jnp.asarray(self.logits) / 3.0
        jax.test_util.check_grads(
            lambda z: answer_preference(z, jnp.array([4, 9])), (z0,),
            order=1, modes=["rev"], eps=1e-2,
        )
        jax.test_util.check_grads(
            lambda z: expected_score(z, jnp.asarray(self.score_ids), jnp.asarray(self.values)),
            (z0,), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2,
        )
        # Only the answer tokens receive gradient.
        g = jax.grad(lambda z: answer_preference(z, jnp.array([4, 9])).sum())(self.logits)
        others = np.delete(np.asarray(g), [4, 9], axis=1)
        np.testing.assert_array_equal(others, 0.0)

    def test_soft_to_preference_label(self):
        first, label = soft_to_preference_label(jnp.array([0.8, 0.3, 0.5]))
        np.testing.assert_array_equal(first, [True, False, True])
        np.testing.assert_allclose(label, [0.8, 0.7, 0.5], atol=1e-7)

    def test_shape_errors(self):
        with pytest.raises(AssertionError):
            answer_preference(self.logits[0], self.ids)
        with pytest.raises(AssertionError):
            answer_preference(self.logits, np.array([1, 2, 3]))
        with pytest.raises(AssertionError):
            debias_position(jnp.zeros(3), jnp.zeros(4))
