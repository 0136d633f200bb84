"""Reference-free and unpaired preference losses (CPO with every loss type and AlphaPO, SimPO,
ORPO, KTO with its reference point) against float64 NumPy references of TRL 1.16's CPOTrainer,
ORPOTrainer and KTOTrainer formulas, and hand-worked values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import rlhf_jax.losses as L


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return np.exp(_logsig(x))


def _np_cpo(pc, pr, *, beta, loss_type, eps=0.0, gamma=0.5, alpha=0.0):
    """TRL `CPOTrainer.cpo_loss`, float64."""
    if alpha != 0.0:
        # TRL: (1 - p^(-alpha)) / alpha with p = exp(logp)
        pc = (1 - np.exp(pc) ** (-alpha)) / alpha
        pr = (1 - np.exp(pr) ** (-alpha)) / alpha
    logits = pc - pr
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(loss_type)


def _np_orpo(pc, pr, *, beta):
    """TRL `ORPOTrainer.odds_ratio_loss` (its `losses` enter the objective with a minus sign),
    float64 with log(1 - e^x) computed directly."""
    log_odds = (pc - pr) - (np.log(-np.expm1(pc)) - np.log(-np.expm1(pr)))
    return -beta * _logsig(log_odds)


def _np_kto(logps, ref, label, *, z0, beta, wd=1.0, wu=1.0, loss_type="kto"):
    """TRL `KTOTrainer.kto_loss` per example (desirable where label = 1), float64."""
    rho = logps - ref
    if loss_type == "kto":
        desirable, undesirable = 1 - _sig(beta * (rho - z0)), 1 - _sig(beta * (z0 - rho))
    else:
        desirable, undesirable = 1 - _sig(beta * rho), _sig(beta * rho)
    return np.where(label > 0, wd * desirable, wu * undesirable)


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _logps(seed, n=8, loc=-1.5, scale=0.6):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, n), rng.normal(loc, scale, n)


class TestCPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=L.CPO_LOSS_TYPES, alpha=[0.0, 0.25])
    def test_matches_trl(self, loss_type, alpha):
        pc, pr = _logps(0)
        eps = 0.15 if loss_type in ("sigmoid", "simpo") else 0.0
        fn = self.variant(lambda a, b: L.cpo_loss(a, b, beta=0.7, loss_type=loss_type,
                                               label_smoothing=eps, simpo_gamma=0.3,
                                               alpha=alpha))
        got = fn(*_f32(pc, pr))
        want = _np_cpo(pc, pr, beta=0.7, loss_type=loss_type, eps=eps, gamma=0.3, alpha=alpha)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    def test_hand_worked(self):
        pc, pr = jnp.array([-1.0]), jnp.array([-3.0])  # margin 2, beta = 0.5: beta * margin = 1
        # sigmoid: -log sig(1) = log(1 + e^-1)
        assert float(L.cpo_loss(pc, pr, beta=0.5)[0]) == pytest.approx(0.3132617, abs=1e-6)
        # hinge: max(0, 1 - 1) = 0; ipo: (2 - 1 / (2 * 0.5))^2 = 1
        assert float(L.cpo_loss(pc, pr, beta=0.5, loss_type="hinge")[0]) == 0.0
        assert float(L.cpo_loss(pc, pr, beta=0.5, loss_type="ipo")[0]) == pytest.approx(1.0)
        # simpo with gamma = 0.5: z = 0.5 * (2 - 0.5 / 0.5) = 0.5: log(1 + e^-0.5)
        got = L.cpo_loss(pc, pr, beta=0.5, loss_type="simpo", simpo_gamma=0.5)
        assert float(got[0]) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
        # AlphaPO, alpha = 1: u(l) = 1 - e^{-l}: u(-1) - u(-3) = e^3 - e = 17.367; beta 0.05
        got = L.cpo_loss(pc, pr, beta=0.05, alpha=1.0)
        z = 0.05 * (math.exp(3) - math.exp(1))
        assert float(got[0]) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)

    def test_check_grads_and_extremes(self):
        pc, pr = _f32(*_logps(1, n=4))
        for loss_type in L.CPO_LOSS_TYPES:
            check_grads(lambda a, b, t=loss_type: jnp.sum(L.cpo_loss(a, b, beta=0.5,
                                                                     loss_type=t)),
                        (pc, pr), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
            big = jnp.array([-1e4, -1e-3, -50.0, -1e4], jnp.float32)
            small = jnp.array([-1e-3, -1e4, -50.0, -1e4], jnp.float32)
            value, grads = jax.value_and_grad(
                lambda a, b, t=loss_type: jnp.sum(L.cpo_loss(a, b, beta=1.0, loss_type=t)),
                argnums=(0, 1))(big, small)
            assert np.isfinite(float(value)), loss_type
            assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), loss_type

    def test_errors(self):
        with pytest.raises(ValueError, match="loss_type"):
            L.cpo_loss(jnp.zeros(2), jnp.zeros(2), loss_type="kto")
        with pytest.raises(AssertionError, match="policy_rejected_logps=\\(3,\\)"):
            L.cpo_loss(jnp.zeros(2), jnp.zeros(3))


class TestSimPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_is_cpo_simpo_and_matches_trl(self):
        pc, pr = _logps(2)
        got = self.variant(lambda a, b: L.simpo_loss(a, b, beta=2.0, gamma=0.5,
                                                  label_smoothing=0.1))(*_f32(pc, pr))
        want = _np_cpo(pc, pr, beta=2.0, loss_type="simpo", eps=0.1, gamma=0.5)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    def test_hand_worked(self):
        # average log-probs -0.5 and -1.0, beta 2, gamma 0.5: z = 2 * 0.5 - 0.5 = 0.5
        got = L.simpo_loss(jnp.array([-0.5]), jnp.array([-1.0]), beta=2.0, gamma=0.5)
        assert float(got[0]) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)

    def test_per_pair_label_smoothing(self):
        pc, pr = _logps(3, n=3)
        eps = np.array([0.0, 0.2, 0.5])
        got = L.simpo_loss(*_f32(pc, pr), beta=2.0, gamma=0.5, label_smoothing=jnp.asarray(eps))
        want = _np_cpo(pc, pr, beta=2.0, loss_type="simpo", eps=eps, gamma=0.5)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


class TestORPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_trl(self):
        # average log-probs on both sides of TRL's log1mexp branch point (-log 2)
        pc = np.array([-0.05, -0.4, -0.69, -0.7, -1.2, -3.0, -8.0, -20.0])
        pr = np.array([-0.9, -0.1, -2.0, -0.3, -0.69, -5.0, -1.0, -0.01])
        got = self.variant(lambda a, b: L.orpo_loss(a, b, beta=0.2))(*_f32(pc, pr))
        np.testing.assert_allclose(np.asarray(got), _np_orpo(pc, pr, beta=0.2),
                                   rtol=2e-5, atol=2e-6)

    def test_hand_worked(self):
        # p_c = 1/2, p_r = 1/4: odds 1 and 1/3, log odds ratio = log 3; beta = 0.1:
        # -0.1 log sig(log 3) = -0.1 log(3/4)
        got = L.orpo_loss(jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)]), beta=0.1)
        assert float(got[0]) == pytest.approx(-0.1 * math.log(0.75), abs=1e-6)

    def test_finite_near_zero_and_very_negative_logps(self):
        # log(1 - e^x) -> -inf as x -> 0: the library clamps x <= -1e-7 (TRL's torch code
        # returns -inf / NaN at exactly 0)
        pc = jnp.array([0.0, -1e-9, -1e4, -30.0], jnp.float32)
        pr = jnp.array([-1e4, 0.0, -1e-6, -30.0], jnp.float32)
        value, grads = jax.value_and_grad(lambda a, b: jnp.sum(L.orpo_loss(a, b)),
                                          argnums=(0, 1))(pc, pr)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)

    def test_check_grads(self):
        pc, pr = _f32(*_logps(4, n=4, loc=-1.0, scale=0.3))
        check_grads(lambda a, b: jnp.sum(L.orpo_loss(a, b, beta=0.5)), (pc, pr), order=1,
                    modes=["rev"], atol=5e-2, rtol=5e-2)


class TestKTO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*L.KTO_LOSS_TYPES)
    def test_matches_trl(self, loss_type):
        rng = np.random.default_rng(5)
        logps, ref = rng.normal(-20, 3, 8), rng.normal(-20, 3, 8)
        label = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
        z0 = 0.0 if loss_type == "apo_zero_unpaired" else 0.7
        fn = self.variant(lambda a, b, c: L.kto_loss(a, b, c, reference_kl=z0, beta=0.2,
                                                  desirable_weight=1.33, undesirable_weight=0.5,
                                                  loss_type=loss_type))
        got = fn(*_f32(logps, ref, label))
        want = _np_kto(logps, ref, label, z0=z0, beta=0.2, wd=1.33, wu=0.5, loss_type=loss_type)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    def test_hand_worked(self):
        # rho = 2, z0 = 1, beta = 1: desirable 1 - sig(1); undesirable 1 - sig(-1) = sig(1)
        args = (jnp.array([-1.0, -1.0]), jnp.array([-3.0, -3.0]), jnp.array([1.0, 0.0]))
        got = L.kto_loss(*args, reference_kl=1.0, beta=1.0)
        s1 = 1 / (1 + math.exp(-1))
        np.testing.assert_allclose(got, [1 - s1, s1], atol=1e-6)
        # apo_zero_unpaired ignores z0: desirable 1 - sig(2), undesirable sig(2)
        got = L.kto_loss(*args, beta=1.0, loss_type="apo_zero_unpaired")
        s2 = 1 / (1 + math.exp(-2))
        np.testing.assert_allclose(got, [1 - s2, s2], atol=1e-6)

    def test_soft_label_mixes_the_two_losses(self):
        logps, ref = jnp.array([-2.0]), jnp.array([-2.5])
        d = L.kto_loss(logps, ref, jnp.array([1.0]), reference_kl=0.1)
        u = L.kto_loss(logps, ref, jnp.array([0.0]), reference_kl=0.1)
        mixed = L.kto_loss(logps, ref, jnp.array([0.3]), reference_kl=0.1)
        np.testing.assert_allclose(mixed, 0.3 * d + 0.7 * u, rtol=1e-6)

    def test_check_grads_and_extremes(self):
        logps, ref = _f32(*_logps(6, n=4, loc=-10.0, scale=2.0))
        label = jnp.array([1.0, 0.0, 1.0, 0.0])
        for loss_type in L.KTO_LOSS_TYPES:
            check_grads(lambda a, t=loss_type: jnp.sum(L.kto_loss(a, ref, label, beta=0.3,
                                                                  reference_kl=0.2,
                                                                  loss_type=t)),
                        (logps,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
            big = jnp.array([1e4, -1e4, 0.0, 1e4], jnp.float32)
            g = jax.grad(lambda a, t=loss_type: jnp.sum(L.kto_loss(a, -a, label,
                                                                   loss_type=t)))(big)
            assert np.all(np.isfinite(np.asarray(g)))

    def test_errors(self):
        with pytest.raises(ValueError, match="loss_type"):
            L.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), loss_type="sigmoid")
        with pytest.raises(AssertionError, match="label=\\(3,\\)"):
            L.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(3))


class TestKTOReferenceKL(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_trl(self):
        rng = np.random.default_rng(7)
        kl_logps, kl_ref = rng.normal(-20, 1, 6), rng.normal(-20.5, 1, 6)
        got = self.variant(L.kto_reference_kl)(*_f32(kl_logps, kl_ref))
        want = max(np.mean(kl_logps - kl_ref), 0.0)  # TRL: mean(...).clamp(min=0)
        assert got.shape == () and float(got) == pytest.approx(want, abs=1e-5)

    def test_hand_worked_clamp_and_stop_gradient(self):
        # mean([1, -3]) = -1 -> clamped to 0; mean([1, 3]) = 2
        assert float(L.kto_reference_kl(jnp.array([1.0, -3.0]), jnp.zeros(2))) == 0.0
        assert float(L.kto_reference_kl(jnp.array([1.0, 3.0]), jnp.zeros(2))) == 2.0
        g = jax.grad(lambda a: L.kto_reference_kl(a, jnp.zeros(2)))(jnp.array([1.0, 3.0]))
        np.testing.assert_array_equal(g, 0.0)

    def test_axis_name_is_the_global_mean(self):
        rng = np.random.default_rng(8)
        a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) - 1.0
        per_device = jax.vmap(lambda x, y: L.kto_reference_kl(x, y, axis_name="d"),
                              axis_name="d")(*_f32(a, b))
        np.testing.assert_allclose(per_device, np.full(4, max(np.mean(a - b), 0.0)), atol=1e-6)

    def test_feeds_kto(self):
        rng = np.random.default_rng(9)
        kl_p, kl_r = rng.normal(-10, 1, 4), rng.normal(-11, 1, 4)
        logps, ref = rng.normal(-10, 1, 4), rng.normal(-10, 1, 4)
        label = np.array([1, 0, 0, 1], np.float32)

        @jax.jit
        def total(kl_p, kl_r, logps, ref, label):
            z0 = L.kto_reference_kl(kl_p, kl_r)
            return L.kto_loss(logps, ref, label, reference_kl=z0, beta=0.1)

        got = total(*_f32(kl_p, kl_r, logps, ref, label))
        want = _np_kto(logps, ref, label, z0=max(np.mean(kl_p - kl_r), 0.0), beta=0.1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
