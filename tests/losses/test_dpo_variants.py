"""DPO variants (EXO, NCA, BCO with its running mean, SPPO, AOT, APO, DiscoPOP) and the
f-divergence scores, against float64 NumPy references of TRL 1.16 DPOTrainer's formulas and
hand-worked values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import rlhf_jax.losses as L

VARIANTS = ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
            "apo_down", "discopop")
SMOOTHED = ("exo_pair", "aot", "aot_unpaired")
F_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return np.exp(_logsig(x))


def _np_scores(rho, fdiv, alpha):
    """TRL's f'(pi / pi_ref) of a float64 log-ratio."""
    if fdiv == "reverse_kl":
        return rho
    if fdiv == "forward_kl":
        return 1.0 - np.exp(-rho)
    if fdiv == "js_divergence":
        return np.log(2.0) + _logsig(rho)
    if abs(alpha - 1.0) < 1e-6:
        return rho
    return (np.exp(np.minimum((alpha - 1.0) * rho, 80.0)) - 1.0) / (alpha - 1.0)


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, nc=None, nr=None, fdiv="reverse_kl",
            alpha=0.5, tau=0.05, bco_delta=0.0):
    """TRL 1.16 `DPOTrainer` per-sequence losses, float64."""
    rho_c, rho_r = pc - rc, pr - rr
    s_c, s_r = _np_scores(rho_c, fdiv, alpha), _np_scores(rho_r, fdiv, alpha)
    d = s_c - s_r
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - beta * d)
    if loss_type == "ipo":
        return (s_c / np.maximum(nc, 1) - s_r / np.maximum(nr, 1) - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -_logsig(beta * (s_c / np.maximum(nc, 1) - s_r / np.maximum(nr, 1)))
    if loss_type == "robust":
        return (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        z = beta * d
        return (_sig(z) * (_logsig(z) - np.log1p(-eps))
                + _sig(-z) * (_logsig(-z) - np.log(eps)))
    if loss_type == "nca_pair":
        zc, zr = beta * rho_c, beta * rho_r
        return -_logsig(zc) - 0.5 * _logsig(-zc) - 0.5 * _logsig(-zr)
    if loss_type == "bco_pair":
        return -_logsig(beta * rho_c - bco_delta) - _logsig(-(beta * rho_r - bco_delta))
    if loss_type == "sppo_hard":
        return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = np.sort(pc - pr) - np.sort(rc - rr)
        else:
            delta = np.sort(rho_c) - np.sort(rho_r)
        return -_logsig(beta * delta) * (1 - eps) - _logsig(-beta * delta) * eps
    if loss_type == "apo_zero":
        return 1 - _sig(beta * rho_c) + _sig(beta * rho_r)
    if loss_type == "apo_down":
        return _sig(beta * rho_c) + 1 - _sig(beta * (rho_c - rho_r))
    if loss_type == "discopop":
        z = beta * d
        w = _sig(z / tau)
        return -_logsig(z) * (1 - w) + np.exp(-z) * w
    raise ValueError(loss_type)


def _pairs(seed=0, n=8, scale=5.0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(-20.0, scale, size=n) for _ in range(4))


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _kwargs(loss_type):
    return {"label_smoothing": 0.1} if loss_type in SMOOTHED else {}


class TestAgainstTRLReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*VARIANTS)
    def test_variant(self, loss_type):
        # log-ratios of a few units: every variant away from saturation
        pc, pr, rc, rr = _pairs(scale=2.0)
        kw = _kwargs(loss_type)
        fn = self.variant(lambda *a: L.dpo_loss(*a, beta=0.3, loss_type=loss_type, **kw))
        got = fn(*_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.3, loss_type=loss_type,
                       eps=kw.get("label_smoothing", 0.0))
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fdiv=["forward_kl", "js_divergence", "alpha_divergence"],
                           loss_type=F_LOSSES)
    def test_f_divergence(self, fdiv, loss_type):
        pc, pr, rc, rr = _pairs(seed=1, scale=0.7)
        nc, nr = np.array([3, 5, 7, 2, 9, 4, 1, 6.0]), np.array([4, 4, 6, 8, 1, 2, 3, 5.0])
        eps = {"exo_pair": 0.2, "robust": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)
        fn = self.variant(lambda *a: L.dpo_loss(
            *a, beta=0.5, loss_type=loss_type, label_smoothing=eps, chosen_lengths=nc,
            rejected_lengths=nr, f_divergence=fdiv, f_alpha=0.3, discopop_tau=0.5))
        got = fn(*_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, eps=eps, nc=nc, nr=nr,
                       fdiv=fdiv, alpha=0.3, tau=0.5)
        np.testing.assert_allclose(np.asarray(got), want, rtol=3e-5, atol=3e-5)


class TestFDivergenceEdges:
    @pytest.mark.parametrize("alpha", [1.0, 1.0 + 1e-7])
    def test_alpha_divergence_near_one_is_reverse_kl(self, alpha):
        args = _f32(*_pairs(seed=2, scale=1.0))
        got = L.dpo_loss(*args, beta=0.2, f_divergence="alpha_divergence", f_alpha=alpha)
        np.testing.assert_allclose(got, L.dpo_loss(*args, beta=0.2), rtol=1e-6)

    def test_length_normalised_losses_keep_the_f_divergence_constants(self):
        """1 - e^{-rho} keeps its constant 1: with unequal lengths it does not cancel."""
        z = jnp.zeros(1)
        got = L.dpo_loss(z + 1.0, z + 1.0, z, z, beta=1.0, loss_type="sigmoid_norm",
                         chosen_lengths=jnp.array([1]), rejected_lengths=jnp.array([2]),
                         f_divergence="forward_kl")
        s = 1.0 - math.exp(-1.0)  # the same score for both; normalised: s / 1 - s / 2 = s / 2
        assert float(got[0]) == pytest.approx(math.log1p(math.exp(-s / 2)), rel=1e-6)


class TestHandWorked:
    # chosen log-ratio 1, rejected -1, beta = 0.5: beta * delta = 1, beta * rho = +-0.5
    ARGS = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))

    @pytest.mark.parametrize("loss_type, kw, want", [
        # q_w = sig(1), q_l = sig(-1): q_w (log q_w - log 0.9) + q_l (log q_l - log 0.1)
        ("exo_pair", {"label_smoothing": 0.1}, 0.11408210766749785),
        # -log sig(0.5) - 0.5 log sig(-0.5) - 0.5 log sig(0.5)
        ("nca_pair", {}, 1.1981539683602134),
        # -log sig(0.5) - log sig(0.5)
        ("bco_pair", {}, 0.9481539683602134),
        # (1 - 1 / (2 * 0.5))^2 + (-1 + 1 / (2 * 0.5))^2 = 0
        ("sppo_hard", {}, 0.0),
        # 1 - sig(0.5) + sig(-0.5)
        ("apo_zero", {}, 0.7550813375962908),
        # sig(0.5) + 1 - sig(1)
        ("apo_down", {}, 0.8914007525718496),
        # w = sig(1 / 0.05) ~ 1: (1 - w)(-log sig(1)) + w e^{-1}
        ("discopop", {}, 0.3678794410588668),
    ])
    def test_single_pair(self, loss_type, kw, want):
        got = L.dpo_loss(*self.ARGS, beta=0.5, loss_type=loss_type, **kw)
        assert float(got[0]) == pytest.approx(want, abs=1e-6)

    def test_bco_delta_shifts_both_rewards(self):
        # -log sig(0.5 - 0.5) - log sig(-(-0.5 - 0.5)) = log 2 + log(1 + e^-1)
        got = L.dpo_loss(*self.ARGS, beta=0.5, loss_type="bco_pair", bco_delta=0.5)
        assert float(got[0]) == pytest.approx(math.log(2) + math.log1p(math.exp(-1)), abs=1e-6)

    def test_aot_sorts_across_the_batch(self):
        # policy margins [3, -1] sorted [-1, 3]; reference margins [0, 2] sorted [0, 2]:
        # delta = [-1, 1]: losses [-log sig(-1), -log sig(1)], not pair-aligned
        pc, pr = jnp.array([0.0, -3.0]), jnp.array([-3.0, -2.0])
        rc, rr = jnp.array([-1.0, -1.0]), jnp.array([-1.0, -3.0])
        got = L.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
        np.testing.assert_allclose(got, [1.3132616875182228, 0.31326168751822286], atol=1e-6)

    def test_aot_unpaired_sorts_each_side(self):
        # chosen log-ratios [3, 1] sorted [1, 3]; rejected [-2, 2] sorted [-2, 2]: delta [3, 1]
        z = jnp.zeros(2)
        got = L.dpo_loss(jnp.array([3.0, 1.0]), jnp.array([-2.0, 2.0]), z, z, beta=1.0,
                         loss_type="aot_unpaired")
        np.testing.assert_allclose(got, [0.04858735157374206, 0.31326168751822286], atol=1e-6)

    @pytest.mark.parametrize("fdiv, alpha, want", [
        # rho_c = 0, rho_r = log 2. forward: s_c = 0, s_r = 1 - 1/2: -log sig(-0.5)
        ("forward_kl", 0.5, 0.9740769841801067),
        # js: s_c = log 2 + log(1/2) = 0, s_r = log 2 + log(2/3) = log(4/3): log(1 + 4/3)
        ("js_divergence", 0.5, math.log(7 / 3)),
        # alpha = 0.5, rho_r = 2 log 2: s_r = (e^{-log 2} - 1) / (-0.5) = 1, s_c = 0: -log sig(-1)
        ("alpha_divergence", 0.5, 1.3132616875182228),
    ])
    def test_f_divergence(self, fdiv, alpha, want):
        rho_r = 2 * math.log(2) if fdiv == "alpha_divergence" else math.log(2)
        z = jnp.zeros(1)
        got = L.dpo_loss(z, z + rho_r, z, z, beta=1.0, f_divergence=fdiv, f_alpha=alpha)
        assert float(got[0]) == pytest.approx(want, abs=1e-6)


class TestBCORunningMean:
    def test_matches_a_float64_running_mean_of_batch_means(self):
        rng = np.random.default_rng(3)
        state = L.bco_running_mean_init()
        assert float(state.mean) == 0.0 and float(state.count) == 0.0
        update = jax.jit(L.bco_running_mean_update)
        seen = []
        for _ in range(5):
            c, r = rng.normal(1.0, 2.0, 4), rng.normal(-1.0, 2.0, 4)
            seen.append(np.mean(np.concatenate([c, r])))
            state = update(state, *_f32(c, r))
            assert float(state.mean) == pytest.approx(np.mean(seen), abs=1e-5)
        assert float(state.count) == 5.0

    def test_hand_worked_and_fed_to_the_loss(self):
        state = L.bco_running_mean_update(L.bco_running_mean_init(), jnp.array([1.0, 3.0]),
                                          jnp.array([-1.0, 1.0]))  # batch mean 1
        state = L.bco_running_mean_update(state, jnp.array([3.0, 3.0]),
                                          jnp.array([3.0, 3.0]))  # 1 + (3 - 1) / 2 = 2
        assert float(state.mean) == 2.0
        pc, pr, rc, rr = _pairs(seed=4, scale=2.0)
        got = jax.jit(lambda d, *a: L.dpo_loss(*a, beta=0.4, loss_type="bco_pair",
                                               bco_delta=d))(state.mean, *_f32(pc, pr, rc, rr))
        want = _np_dpo(pc, pr, rc, rr, beta=0.4, loss_type="bco_pair", bco_delta=2.0)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    def test_axis_name_averages_over_devices(self):
        rng = np.random.default_rng(5)
        c, r = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
        per_device = jax.vmap(lambda c, r: L.bco_running_mean_update(
            L.bco_running_mean_init(), c, r, axis_name="d"), axis_name="d")(*_f32(c, r))
        np.testing.assert_allclose(per_device.mean, np.full(4, np.mean([c, r])), atol=1e-6)

    def test_gradient_is_stopped(self):
        g = jax.grad(lambda c: L.bco_running_mean_update(
            L.bco_running_mean_init(), c, jnp.zeros(2)).mean)(jnp.ones(2))
        np.testing.assert_array_equal(g, 0.0)


class TestGradientsAndExtremes:
    @pytest.mark.parametrize("loss_type", VARIANTS)
    def test_check_grads(self, loss_type):
        pc, pr, rc, rr = _f32(*_pairs(seed=6, n=4, scale=1.0))
        kw = _kwargs(loss_type)
        check_grads(lambda a, b: jnp.sum(L.dpo_loss(a, b, rc, rr, beta=0.3, loss_type=loss_type,
                                                    **kw)),
                    (pc, pr), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)

    @pytest.mark.parametrize("loss_type", [t for t in VARIANTS if t != "discopop"])
    def test_finite_values_and_gradients_at_extremes(self, loss_type):
        # sppo_hard is a squared error (finite, large); every other variant saturates
        big = jnp.array([1e3, -1e3, 0.0, 3e2], jnp.float32)
        z = jnp.zeros(4, jnp.float32)
        kw = _kwargs(loss_type)
        total = lambda pc: jnp.sum(L.dpo_loss(pc, -pc, z, z, beta=1.0, loss_type=loss_type,
                                              **kw))
        value, grad = jax.value_and_grad(total)(big)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))

    def test_discopop_is_finite_while_its_exponential_is(self):
        # e^{-z} is finite in float32 for z > -88 (TRL's formula overflows beyond, as here)
        z = jnp.zeros(3, jnp.float32)
        pc = jnp.array([80.0, -40.0, 0.0], jnp.float32)  # beta * delta = 2 * pc
        value, grad = jax.value_and_grad(lambda p: jnp.sum(L.dpo_loss(
            p, -p, z, z, beta=0.5, loss_type="discopop")))(pc)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))

    def test_alpha_divergence_exponent_is_clamped(self):
        z = jnp.zeros(2, jnp.float32)
        big = jnp.array([1e4, -1e4], jnp.float32)
        value, grad = jax.value_and_grad(lambda p: jnp.sum(L.dpo_loss(
            p, z, z, z, beta=0.1, f_divergence="alpha_divergence", f_alpha=2.0)))(big)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


class TestErrors:
    ARGS = _f32(*_pairs(n=2))

    def test_exo_needs_label_smoothing(self):
        with pytest.raises(ValueError, match="exo_pair' needs 0 < label_smoothing < 1"):
            L.dpo_loss(*self.ARGS, loss_type="exo_pair")

    @pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "aot",
                                           "aot_unpaired", "apo_zero", "apo_down"])
    def test_f_divergence_only_where_trl_supports_it(self, loss_type):
        with pytest.raises(ValueError, match="f_divergence='forward_kl' is not supported"):
            L.dpo_loss(*self.ARGS, loss_type=loss_type, f_divergence="forward_kl",
                       **_kwargs(loss_type))

    @pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "apo_zero", "discopop"])
    def test_label_smoothing_is_refused_where_unused(self, loss_type):
        with pytest.raises(ValueError, match="label_smoothing is not used"):
            L.dpo_loss(*self.ARGS, loss_type=loss_type, label_smoothing=0.1)

    def test_bco_delta_only_for_bco(self):
        with pytest.raises(ValueError, match="bco_delta is only used"):
            L.dpo_loss(*self.ARGS, loss_type="nca_pair", bco_delta=1.0)

    def test_unknown_names(self):
        with pytest.raises(ValueError, match="loss_type"):
            L.dpo_loss(*self.ARGS, loss_type="kto")
        with pytest.raises(ValueError, match="f_divergence"):
            L.dpo_loss(*self.ARGS, f_divergence="hellinger")
