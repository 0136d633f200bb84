"""Plackett-Luce ranking loss against a float64 NumPy reference, hand-worked values, masks for
ragged K, and its Bradley-Terry special case."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rlhf_jax.losses as L


def _np_plackett_luce(rewards, ranks, mask=None):
    """-log P(ranking) with each position's risk set = items ranked at or below it, float64."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.ones_like(rewards) if mask is None else np.asarray(mask)
    out = np.zeros(rewards.shape[0])
    for b in range(rewards.shape[0]):
        valid = [k for k in range(rewards.shape[1]) if mask[b, k] > 0]
        nll = 0.0
        for i in valid:
            pool = [rewards[b, j] for j in valid if ranks[b, j] >= ranks[b, i]]
            nll -= rewards[b, i] - np.logaddexp.reduce(pool)
        out[b] = nll
    return out


def _random_problem(seed, b=5, k=4):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0.0, 2.0, size=(b, k))
    ranks = np.stack([rng.permutation(k) for _ in range(b)])
    return rewards, ranks


class TestPlackettLuce(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rewards, ranks = _random_problem(0)
        got = self.variant(L.plackett_luce_loss)(jnp.asarray(rewards, jnp.float32),
                                              jnp.asarray(ranks))
        assert got.shape == (5,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), _np_plackett_luce(rewards, ranks),
                                   rtol=2e-5, atol=2e-5)

    def test_hand_worked_k3(self):
        # rewards (a, b, c) = (2, 1, 0) ranked a > b > c:
        # -[2 - log(e^2 + e + 1)] - [1 - log(e + 1)] - [0 - 0]
        want = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
        got = L.plackett_luce_loss(jnp.array([[2.0, 1.0, 0.0]]), jnp.array([[0, 1, 2]]))
        assert float(got[0]) == pytest.approx(want, abs=1e-6)

    def test_probabilities_of_all_rankings_sum_to_one(self):
        rewards = jnp.array([[0.3, -1.2, 2.0, 0.5]])
        total = 0.0
        for perm in itertools.permutations(range(4)):
            ranks = np.empty(4, np.int32)
            ranks[list(perm)] = np.arange(4)
            total += math.exp(-float(L.plackett_luce_loss(rewards, jnp.asarray(ranks)[None])[0]))
        assert total == pytest.approx(1.0, abs=1e-5)

    def test_k2_is_bradley_terry(self):
        rng = np.random.default_rng(1)
        chosen, rejected = rng.normal(size=6), rng.normal(size=6)
        rewards = jnp.asarray(np.stack([rejected, chosen], 1), jnp.float32)
        ranks = jnp.tile(jnp.array([1, 0]), (6, 1))  # the chosen (column 1) is best
        want = L.bradley_terry_loss(jnp.asarray(chosen, jnp.float32),
                                    jnp.asarray(rejected, jnp.float32))
        np.testing.assert_allclose(L.plackett_luce_loss(rewards, ranks), want, rtol=1e-5,
                                   atol=1e-6)

    def test_ties_share_a_risk_set(self):
        # ranks (0, 0, 1): both tied items' denominators include each other and the last
        r = np.array([[0.5, -0.5, 1.0]])
        got = L.plackett_luce_loss(jnp.asarray(r, jnp.float32), jnp.array([[0, 0, 1]]))
        lse_all = np.logaddexp.reduce(r[0])
        want = -(0.5 - lse_all) - (-0.5 - lse_all) - 0.0
        assert float(got[0]) == pytest.approx(want, abs=1e-5)

    def test_shift_invariance(self):
        rewards, ranks = _random_problem(2)
        r = jnp.asarray(rewards, jnp.float32)
        np.testing.assert_allclose(L.plackett_luce_loss(r + 7.5, jnp.asarray(ranks)),
                                   L.plackett_luce_loss(r, jnp.asarray(ranks)), atol=1e-4)

    def test_mask_equals_the_sliced_problem_with_zero_gradient(self):
        rewards, ranks = _random_problem(3, b=3, k=5)
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
        r = jnp.asarray(rewards, jnp.float32)
        got = L.plackett_luce_loss(r, jnp.asarray(ranks), mask=jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(got), _np_plackett_luce(rewards, ranks, mask),
                                   rtol=2e-5, atol=2e-5)
        for b in range(3):
            keep = mask[b] > 0
            sliced = L.plackett_luce_loss(r[b:b + 1, keep], jnp.asarray(ranks[b:b + 1, keep]))
            assert float(got[b]) == pytest.approx(float(sliced[0]), abs=1e-5)
        grad = jax.grad(lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(ranks),
                                                               mask=jnp.asarray(mask))))(r)
        np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)

    def test_check_grads_and_extremes(self):
        rewards, ranks = _random_problem(4, b=2, k=3)
        check_grads(lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(ranks))),
                    (jnp.asarray(rewards, jnp.float32),), order=1, modes=["rev"], atol=5e-2,
                    rtol=5e-2)
        big = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3e3]], jnp.float32)
        value, grad = jax.value_and_grad(
            lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.array([[0, 1, 2], [0, 1, 2]]))))(big)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))

    def test_shape_errors_name_the_argument(self):
        with pytest.raises(AssertionError, match="ranks"):
            L.plackett_luce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32))
