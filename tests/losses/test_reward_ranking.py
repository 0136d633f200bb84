"""Plackett-Luce ranking loss: float64 NumPy reference, hand-worked values, the Bradley-Terry
special case, shift invariance, masks for ragged K (masked == sliced, zero gradient), ties,
gradients and extreme rewards.

Convention (from the docstring): ``ranks[b, k]`` is the rank of completion ``k``, 0 = best; the
ranking is read best first and each chosen item's risk set is every valid item ranked at or
below it (tied items share a risk set, Breslow's approximation)."""

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
    """-log P(ranking), float64: order the valid items best first and, at each step, take the
    chosen item's log-softmax over the items not yet chosen (ties: all items of equal or worse
    rank)."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.ones(rewards.shape, bool) if mask is None else np.asarray(mask) > 0
    out = np.zeros(rewards.shape[0])
    for b in range(rewards.shape[0]):
        valid = np.nonzero(mask[b])[0]
        order = valid[np.argsort(ranks[b, valid], kind="stable")]
        nll = 0.0
        for i in order:
            pool = [rewards[b, j] for j in valid if ranks[b, j] >= ranks[b, i]]
            nll -= rewards[b, i] - np.logaddexp.reduce(pool)
        out[b] = nll
    return out


def _np_pl_permutation(rewards_row, order):
    """-log P(order) for a strict best-first order, by the sequential-choice definition."""
    remaining = list(order)
    nll = 0.0
    for i in order:
        nll -= rewards_row[i] - np.logaddexp.reduce(rewards_row[remaining])
        remaining.remove(i)
    return nll


def _random_problem(seed, b=5, k=4):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0.0, 2.0, size=(b, k))
    ranks = np.stack([rng.permutation(k) for _ in range(b)])
    return rewards, ranks


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ragged K = 2, 3, 5, 1 and 0 valid completions out of 5
RAGGED_MASK = np.array([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0],
                        [0, 0, 0, 0, 0]])


class TestPlackettLuce(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rewards, ranks = _random_problem(0)
        got = self.variant(L.plackett_luce_loss)(_f32(rewards), jnp.asarray(ranks))
        assert got.shape == (5,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), _np_plackett_luce(rewards, ranks),
                                   rtol=2e-5, atol=2e-5)
        for b in range(5):  # and the sequential-choice definition
            order = np.argsort(ranks[b])
            assert float(got[b]) == pytest.approx(_np_pl_permutation(rewards[b], order),
                                                  rel=2e-5, abs=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_matches_reference_and_sliced_problem(self):
        rewards, ranks = _random_problem(3, b=5, k=5)
        mask = RAGGED_MASK
        fn = self.variant(lambda r, k, m: L.plackett_luce_loss(r, k, mask=m))
        got = np.asarray(fn(_f32(rewards), jnp.asarray(ranks), jnp.asarray(mask)))
        np.testing.assert_allclose(got, _np_plackett_luce(rewards, ranks, mask), rtol=2e-5,
                                   atol=2e-5)
        for b in range(4):  # rows with at least one valid completion
            keep = mask[b] > 0
            sliced = L.plackett_luce_loss(_f32(rewards[b:b + 1, keep]),
                                          jnp.asarray(ranks[b:b + 1, keep]))
            assert got[b] == pytest.approx(float(sliced[0]), abs=1e-5)
        # one valid completion or none: probability 1, loss 0
        np.testing.assert_array_equal(got[3:], 0.0)

    def test_hand_worked_k3(self):
        # rewards (0, 1, 2) with ranks (2, 0, 1): best first the order is item 1, item 2, item 0.
        #   step 1: 1 - log(e^0 + e^1 + e^2) = 1 - log 11.107338 = 1 - 2.407606 = -1.407606
        #   step 2: 2 - log(e^0 + e^2)       = 2 - log 8.389056  = 2 - 2.126928 = -0.126928
        #   step 3: 0 - log(e^0)             = 0
        #   loss = 1.407606 + 0.126928 = 1.534534
        got = L.plackett_luce_loss(jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2, 0, 1]]))
        assert float(got[0]) == pytest.approx(1.534534, abs=2e-6)
        # identity ranking of (2, 1, 0): -(2 - log(e^2 + e + 1)) - (1 - log(e + 1))
        #   = -(2 - 2.407606) - (1 - 1.313262) = 0.407606 + 0.313262 = 0.720868
        got = L.plackett_luce_loss(jnp.array([[2.0, 1.0, 0.0]]), jnp.array([[0, 1, 2]]))
        want = -(2 - math.log(math.e**2 + math.e + 1)) - (1 - math.log(math.e + 1))
        assert want == pytest.approx(0.720868, abs=1e-6)
        assert float(got[0]) == pytest.approx(want, abs=2e-6)
        # equal rewards: every one of the 3! orders has probability 1/6, loss log 6
        got = L.plackett_luce_loss(jnp.full((1, 3), 0.7), jnp.array([[1, 2, 0]]))
        assert float(got[0]) == pytest.approx(math.log(6.0), abs=2e-6)

    def test_probabilities_of_all_rankings_sum_to_one(self):
        rewards = jnp.array([[0.3, -1.2, 2.0, 0.5]])
        perms = list(itertools.permutations(range(4)))
        ranks = np.empty((len(perms), 4), np.int32)
        for n, perm in enumerate(perms):
            ranks[n, list(perm)] = np.arange(4)
        nll = L.plackett_luce_loss(jnp.tile(rewards, (len(perms), 1)), jnp.asarray(ranks))
        assert float(jnp.sum(jnp.exp(-nll))) == pytest.approx(1.0, abs=1e-5)

    def test_k2_is_bradley_terry(self):
        rng = np.random.default_rng(1)
        chosen, rejected = rng.normal(size=6), rng.normal(size=6)
        want = L.bradley_terry_loss(_f32(chosen), _f32(rejected))
        # chosen in column 1 (rank 0), rejected in column 0 (rank 1)
        rewards = _f32(np.stack([rejected, chosen], 1))
        ranks = jnp.tile(jnp.array([1, 0]), (6, 1))
        np.testing.assert_allclose(L.plackett_luce_loss(rewards, ranks), want, rtol=1e-5,
                                   atol=1e-6)
        # and a K = 3 problem with one completion masked out
        padded = _f32(np.stack([rejected, rng.normal(size=6) * 50, chosen], 1))
        ranks3 = jnp.tile(jnp.array([1, 0, 0]), (6, 1))
        mask = jnp.tile(jnp.array([1, 0, 1]), (6, 1))
        np.testing.assert_allclose(L.plackett_luce_loss(padded, ranks3, mask=mask), want,
                                   rtol=1e-5, atol=1e-6)

    def test_ties_share_a_risk_set(self):
        # ranks (0, 0, 1): both tied items' denominators include each other and the last
        r = np.array([[0.5, -0.5, 1.0]])
        got = L.plackett_luce_loss(_f32(r), jnp.array([[0, 0, 1]]))
        lse_all = np.logaddexp.reduce(r[0])
        want = -(0.5 - lse_all) - (-0.5 - lse_all) - 0.0
        assert float(got[0]) == pytest.approx(want, abs=1e-5)
        np.testing.assert_allclose(got, _np_plackett_luce(r, np.array([[0, 0, 1]])), atol=1e-5)

    def test_rank_gaps_do_not_matter(self):
        rewards, ranks = _random_problem(5)
        spread = ranks * 7 + 3  # same order, different integers
        np.testing.assert_allclose(L.plackett_luce_loss(_f32(rewards), jnp.asarray(spread)),
                                   L.plackett_luce_loss(_f32(rewards), jnp.asarray(ranks)),
                                   rtol=1e-6, atol=1e-6)

    def test_shift_invariance(self):
        rewards, ranks = _random_problem(2)
        shift = np.array([7.5, -3.0, 0.25, 100.0, -40.0])[:, None]  # a constant per prompt
        base = L.plackett_luce_loss(_f32(rewards), jnp.asarray(ranks))
        np.testing.assert_allclose(L.plackett_luce_loss(_f32(rewards + shift),
                                                        jnp.asarray(ranks)),
                                   base, rtol=1e-4, atol=1e-4)
        mask = jnp.asarray(RAGGED_MASK[:, :4])
        np.testing.assert_allclose(
            L.plackett_luce_loss(_f32(rewards + shift), jnp.asarray(ranks), mask=mask),
            L.plackett_luce_loss(_f32(rewards), jnp.asarray(ranks), mask=mask),
            rtol=1e-4, atol=1e-4)

    def test_masked_entries_get_zero_gradient_whatever_they_hold(self):
        rewards, ranks = _random_problem(6, b=5, k=5)
        mask = RAGGED_MASK
        junk = np.where(mask > 0, rewards, np.array([1e4, -1e4, 0.0, 3.0, -7.0]))
        junk_ranks = np.where(mask > 0, ranks, -1)  # padded ranks: anything
        for m in (jnp.asarray(mask), jnp.asarray(mask > 0)):  # float or bool mask
            f = jax.jit(jax.value_and_grad(
                lambda x, m=m: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(junk_ranks),
                                                            mask=m))))
            value, grad = f(_f32(junk))
            clean_value, clean_grad = f(_f32(np.where(mask > 0, rewards, 0.0)))
            assert float(value) == pytest.approx(float(clean_value), rel=1e-6)
            assert float(value) == pytest.approx(
                float(np.sum(_np_plackett_luce(rewards, ranks, mask))), rel=2e-5)
            grad = np.asarray(grad)
            assert np.all(np.isfinite(grad))
            np.testing.assert_array_equal(grad[mask == 0], 0.0)
            np.testing.assert_allclose(grad, clean_grad, rtol=1e-6, atol=1e-7)
        # rewards of valid completions sum to zero gradient per prompt (shift invariance)
        np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-5)

    def test_gradient_matches_float64_reference(self):
        # d nll / d r_i = sum over steps k with i in the risk set of softmax_k(i) - 1[i chosen]
        rewards, ranks = _random_problem(7, b=3, k=4)
        grad = jax.grad(lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(ranks))))(
            _f32(rewards))
        want = np.zeros_like(rewards)
        for b in range(3):
            for i in range(4):
                pool = ranks[b] >= ranks[b, i]
                p = np.exp(rewards[b] - np.logaddexp.reduce(rewards[b, pool])) * pool
                want[b] += p
                want[b, i] -= 1.0
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-6)

    def test_check_grads(self):
        rewards, ranks = _random_problem(4, b=2, k=3)
        check_grads(lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(ranks))),
                    (_f32(rewards),), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
        mask = jnp.array([[1, 1, 0], [1, 1, 1]])
        check_grads(lambda x: jnp.sum(L.plackett_luce_loss(x, jnp.asarray(ranks), mask=mask)),
                    (_f32(rewards),), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)

    def test_finite_at_extreme_rewards(self):
        big = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3e3], [1e4, 1e4, -1e4]], np.float32)
        ranks = np.array([[0, 1, 2], [0, 1, 2], [2, 0, 1]])
        mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
        for m in (None, jnp.asarray(mask)):
            value, grad = jax.value_and_grad(lambda x, m=m: jnp.sum(
                L.plackett_luce_loss(x, jnp.asarray(ranks), mask=m)))(jnp.asarray(big))
            assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        # values still match float64 where they are representable
        got = L.plackett_luce_loss(jnp.asarray(big), jnp.asarray(ranks), mask=jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(got), _np_plackett_luce(big, ranks, mask),
                                   rtol=1e-5, atol=1e-3)

    def test_dtype(self):
        rewards, ranks = _random_problem(8, b=2, k=3)
        got = L.plackett_luce_loss(jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(ranks))
        assert got.shape == (2,) and got.dtype == jnp.float32

    def test_shape_errors_name_the_argument(self):
        with pytest.raises(AssertionError, match="ranks=\\(2, 4\\)"):
            L.plackett_luce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32))
        with pytest.raises(AssertionError, match="mask=\\(2, 2\\)"):
            L.plackett_luce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32),
                                 mask=jnp.ones((2, 2)))
        with pytest.raises(AssertionError, match="`rewards` must have rank 2"):
            L.plackett_luce_loss(jnp.zeros(3), jnp.zeros(3, jnp.int32))
