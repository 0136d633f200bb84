"""Core preference losses: DPO (sigmoid, hinge, IPO, robust, sigmoid_norm), MPO mixtures,
implicit-reward metrics, Bradley-Terry (margin, smoothing, soft labels), reward centering,
K-wise ranking and best-of-K, against float64 NumPy references and hand-worked values."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import rlhf_jax.losses as L


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _pairs(seed=0, n=6):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-20.0, 5.0, size=n) for _ in range(4))
    return pc, pr, rc, rr


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, nc=None, nr=None):
    """TRL DPOTrainer formulas, float64 (delta = chosen log-ratio - rejected log-ratio)."""
    sc, sr = pc - rc, pr - rr
    d = sc - sr
    if loss_type == "sigmoid":
        return -_logsig(beta * d) * (1 - eps) - _logsig(-beta * d) * eps
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - beta * d)
    if loss_type == "ipo":
        return (sc / nc - sr / nr - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -_logsig(beta * (sc / nc - sr / nr))
    if loss_type == "robust":
        return (-_logsig(beta * d) * (1 - eps) + _logsig(-beta * d) * eps) / (1 - 2 * eps)
    raise ValueError(loss_type)


class TestDPOLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("sigmoid", "hinge", "ipo", "sigmoid_norm", "robust")
    def test_matches_trl_reference(self, loss_type):
        pc, pr, rc, rr = _pairs()
        nc, nr = np.array([3, 5, 7, 2, 9, 4.0]), np.array([4, 4, 6, 8, 1, 2.0])
        eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
        fn = self.variant(lambda *a: L.dpo_loss(*a, beta=0.2, loss_type=loss_type,
                                             label_smoothing=eps, chosen_lengths=nc,
                                             rejected_lengths=nr))
        got = fn(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)))
        want = _np_dpo(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, eps=eps, nc=nc, nr=nr)
        assert got.shape == (6,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    def test_hand_worked(self):
        # log-ratios: chosen (-1) - (-2) = 1, rejected (-3) - (-2) = -1, delta = 2, beta = 0.5.
        args = [jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0])]
        # sigmoid: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
        assert float(L.dpo_loss(*args, beta=0.5)[0]) == pytest.approx(0.3132617, abs=1e-6)
        # hinge: relu(1 - 0.5 * 2) = 0
        assert float(L.dpo_loss(*args, beta=0.5, loss_type="hinge")[0]) == 0.0
        # ipo with lengths 1: (2 - 1 / (2 * 0.5))^2 = (2 - 1)^2 = 1
        ipo = L.dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_lengths=jnp.array([1]),
                         rejected_lengths=jnp.array([1]))
        assert float(ipo[0]) == pytest.approx(1.0, abs=1e-6)

    def test_every_loss_type_is_finite_with_finite_gradients_at_extremes(self):
        big = jnp.array([1e4, -1e4, 0.0, 3e3], jnp.float32)
        small = jnp.array([-1e4, 1e4, 0.0, -3e3], jnp.float32)
        zeros = jnp.zeros(4, jnp.float32)
        lengths = jnp.array([4, 1, 7, 2])
        for loss_type in L.DPO_LOSS_TYPES:
            if loss_type == "discopop":
                continue  # its exp(-beta * delta) term overflows at |delta| ~ 1e3; see below
            def total(pc, loss_type=loss_type):
                # EXO needs a label-smoothing epsilon in (0, 1), as in TRL.
                eps = 1e-3 if loss_type == "exo_pair" else 0.0
                return L.dpo_loss(pc, small, zeros, zeros, beta=0.1, loss_type=loss_type,
                                  label_smoothing=eps, chosen_lengths=lengths,
                                  rejected_lengths=lengths).sum()

            value, grad = jax.value_and_grad(total)(big)
            assert np.isfinite(float(value)), loss_type
            assert np.all(np.isfinite(np.asarray(grad))), loss_type

    def test_discopop_is_finite_at_moderate_log_ratios(self):
        # DiscoPOP multiplies exp(-beta * delta) by sigmoid(delta / tau); as in TRL's formula the
        # exponential overflows float32 for beta * delta below about -88, so the bound is |delta|
        # <= 800 at beta = 0.1.
        pc = jnp.array([800.0, -800.0, 0.0, 30.0])
        zeros = jnp.zeros(4)
        value, grad = jax.value_and_grad(
            lambda x: L.dpo_loss(x, zeros, zeros, zeros, beta=0.1, loss_type="discopop").sum())(pc)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))

    def test_sigmoid_gradient_checks(self):
        pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _pairs(1, 3))
        jax.test_util.check_grads(
            lambda a, b: L.dpo_loss(a, b, rc, rr, beta=0.1).sum(), (pc, pr), order=1,
            modes=["rev"], atol=1e-2, rtol=1e-2)

    def test_unknown_loss_type_names_the_allowed_values(self):
        x = jnp.zeros(2)
        with pytest.raises(ValueError, match="loss_type") as err:
            L.dpo_loss(x, x, x, x, loss_type="nope")
        assert "sigmoid" in str(err.value)

    def test_mismatched_shapes_raise(self):
        with pytest.raises((AssertionError, ValueError)):
            L.dpo_loss(jnp.zeros(2), jnp.zeros(3), jnp.zeros(2), jnp.zeros(2))

    def test_docstring_carries_the_formula(self):
        doc = L.dpo_loss.__doc__
        assert "TRL" in doc and "log" in doc and "sigmoid" in doc and "beta" in doc


class TestMixedDPOLoss:
    def test_is_the_weighted_sum(self):
        pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _pairs(2))
        got = L.mixed_dpo_loss(pc, pr, rc, rr, loss_weights={"sigmoid": 0.8, "hinge": 0.2},
                               beta=0.3)
        want = 0.8 * _np_dpo(*map(np.asarray, (pc, pr, rc, rr)), beta=0.3, loss_type="sigmoid") \
            + 0.2 * _np_dpo(*map(np.asarray, (pc, pr, rc, rr)), beta=0.3, loss_type="hinge")
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


class TestDPORewardMetrics:
    def test_implicit_rewards(self):
        pc, pr, rc, rr = _pairs(3)
        m = L.dpo_reward_metrics(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                                 beta=0.1)
        chosen, rejected = 0.1 * (pc - rc), 0.1 * (pr - rr)
        np.testing.assert_allclose(np.asarray(m.chosen), chosen, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m.rejected), rejected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m.margin), chosen - rejected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(m.accuracy), (chosen > rejected).astype(float))


class TestBradleyTerryLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_margin_smoothing_and_soft_labels(self):
        rng = np.random.default_rng(4)
        rc, rr, m = rng.normal(size=5), rng.normal(size=5), rng.uniform(0, 1, size=5)
        p = np.array([1.0, 0.9, 0.5, 0.2, 0.0])
        f = lambda x: jnp.asarray(x, jnp.float32)
        d = rc - rr - m
        got = self.variant(lambda a, b, mm: L.bradley_terry_loss(a, b, margin=mm))(f(rc), f(rr), f(m))
        np.testing.assert_allclose(np.asarray(got), -_logsig(d), rtol=1e-5, atol=1e-6)
        got = self.variant(lambda a, b: L.bradley_terry_loss(a, b, label=f(p)))(f(rc), f(rr))
        want = -p * _logsig(rc - rr) - (1 - p) * _logsig(rr - rc)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        got = L.bradley_terry_loss(f(rc), f(rr), label_smoothing=0.1)
        want = -0.9 * _logsig(rc - rr) - 0.1 * _logsig(rr - rc)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    def test_hand_worked_llama2_margin(self):
        # r_c - r_r - m = 2 - 0 - 1 = 1: -log sigmoid(1) = 0.3132617
        got = L.bradley_terry_loss(jnp.array([2.0]), jnp.array([0.0]), margin=jnp.array([1.0]))
        assert float(got[0]) == pytest.approx(0.3132617, abs=1e-6)

    def test_finite_at_extremes(self):
        rc = jnp.array([1e4, -1e4])
        value, grad = jax.value_and_grad(
            lambda x: L.bradley_terry_loss(x, -x).sum())(rc)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


class TestRewardCentering:
    def test_is_trl_center_rewards_term(self):
        # c (r_c + r_r)^2: 0.01 * (1.5 - 0.5)^2 = 0.01
        got = L.reward_centering_loss(jnp.array([1.5]), jnp.array([-0.5]), coefficient=0.01)
        assert float(got[0]) == pytest.approx(0.01, abs=1e-7)


class TestKwiseRankingLoss:
    def test_all_pairs_each_prompt_weighted_once(self):
        rng = np.random.default_rng(5)
        rewards = rng.normal(size=(3, 4))
        ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]])
        got = L.kwise_ranking_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks))
        want = []
        for b in range(3):
            terms = []
            for i, j in itertools.combinations(range(4), 2):
                win, lose = (i, j) if ranks[b, i] < ranks[b, j] else (j, i)
                terms.append(-_logsig(rewards[b, win] - rewards[b, lose]))
            want.append(np.mean(terms))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    def test_k2_reduces_to_bradley_terry(self):
        rewards = jnp.array([[0.3, -0.4]])
        got = L.kwise_ranking_loss(rewards, jnp.array([[0, 1]]))
        bt = L.bradley_terry_loss(rewards[:, 0], rewards[:, 1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(bt), rtol=1e-6)


class TestBestOfKLoss:
    def test_softmax_cross_entropy_with_the_best_index(self):
        rewards = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
        best = np.array([1, 0])
        got = L.best_of_k_loss(jnp.asarray(rewards, jnp.float32), jnp.asarray(best))
        logz = np.log(np.exp(rewards).sum(-1))
        want = logz - rewards[np.arange(2), best]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
