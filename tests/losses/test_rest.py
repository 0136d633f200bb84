"""ReST's offline losses (`rest_bc_loss`, `gold_loss`, `vmpo_loss`) against float64 NumPy
references written from the papers' formulas (ReST's filtered BC, reward-weighted regression,
GOLD's importance-weighted likelihood as in its released fairseq criterion, V-MPO's E-step
weights and temperature dual as rlax computes them), hand-worked values, masks, gradients and
extreme inputs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import rlhf_jax.losses as L
from rlhf_jax.sharding import MeshConfig, make_mesh

# --------------------------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------------------------


def _np_rest(logps, mask, rewards, *, threshold=None, weighting="none", temperature=1.0):
    logps, mask = np.asarray(logps, np.float64), np.asarray(mask, bool)
    r = np.asarray(rewards, np.float64)
    kept = mask.any(-1) & (np.ones_like(r, bool) if threshold is None else r > threshold)
    if weighting == "none":
        w = kept.astype(np.float64)
    elif weighting == "reward":
        w = np.where(kept, r, 0.0)
    else:
        if kept.any():
            s = r[kept] / temperature
            w = np.zeros_like(r)
            w[kept] = np.exp(s - np.logaddexp.reduce(s)) * kept.sum()
        else:
            w = np.zeros_like(r)
    tok_mask = mask & kept[:, None]
    loss = np.where(tok_mask, -w[:, None] * logps, 0.0)
    return loss, tok_mask, w, kept


def _np_gold(logps, mask, returns, *, behaviour=None, u=0.2):
    """fairseq `label_smoothed_nll_loss` of the GOLD code with epsilon 0, per token:
    clamp(p_old, iw_min, 1) * Q * nll, 0 on padding."""
    logps, mask = np.asarray(logps, np.float64), np.asarray(mask, bool)
    behaviour = logps if behaviour is None else np.asarray(behaviour, np.float64)
    q = np.asarray(returns, np.float64)
    q = q[:, None] if q.ndim == 1 else q
    b1 = np.clip(np.exp(behaviour), u, 1.0)
    return np.where(mask, b1 * q * -logps, 0.0)


def _np_vmpo(logps, adv, eta, *, mask=None, eps_eta=0.1, frac=0.5, kl=None, alpha=None,
             eps_kl=0.01):
    logps, adv = np.asarray(logps, np.float64), np.asarray(adv, np.float64)
    valid = np.ones(len(adv), bool) if mask is None else np.asarray(mask, bool)
    n_valid = valid.sum()
    k = max(int(math.floor(frac * n_valid)), 1)
    ranked = np.sort(adv[valid])[::-1]
    cutoff = ranked[k - 1] if n_valid else np.inf
    sel = valid & (adv >= cutoff)
    psi = np.zeros_like(adv)
    temp_loss = 0.0
    if sel.any():
        s = adv[sel] / eta
        lse = np.logaddexp.reduce(s)
        psi[sel] = np.exp(s - lse)
        temp_loss = eta * eps_eta + eta * (lse - np.log(sel.sum()))
    policy = np.where(valid, -psi * n_valid * logps, 0.0)
    out = {"policy_loss": policy, "temperature_loss": temp_loss, "weights": psi,
           "selected": sel.astype(np.float64)}
    if kl is not None:
        kl = np.asarray(kl, np.float64)
        out["kl_loss"] = np.where(valid, alpha * kl, 0.0)
        out["multiplier_loss"] = np.where(valid, alpha * (eps_kl - kl), 0.0)
    else:
        out["kl_loss"] = out["multiplier_loss"] = np.zeros_like(adv)
    return out


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _f32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


def _samples(seed, b=8, t=6):
    rng = np.random.default_rng(seed)
    logps = -np.abs(rng.normal(1.5, 1.0, (b, t)))
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, b)[:, None]
    mask[-1] = False  # a padding row
    rewards = rng.uniform(0.0, 1.0, b)
    return logps, mask, rewards


# --------------------------------------------------------------------------------------------
# ReST BC
# --------------------------------------------------------------------------------------------


class TestReSTBC(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        (None, "none", 1.0), (0.5, "none", 1.0), (0.3, "reward", 1.0), (None, "exp", 0.2),
        (0.4, "exp", 0.05),
    )
    def test_matches_float64_reference(self, threshold, weighting, temperature):
        logps, mask, rewards = _samples(0)
        got = self.variant(lambda x, m, r: L.rest_bc_loss(
            x, m, r, threshold=threshold, weighting=weighting, temperature=temperature))(
            *_f32(logps), jnp.asarray(mask), *_f32(rewards))
        loss, tok_mask, w, kept = _np_rest(logps, mask, rewards, threshold=threshold,
                                           weighting=weighting, temperature=temperature)
        assert got.loss.shape == (8, 6) and got.loss.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got.loss), loss, rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(np.asarray(got.mask), tok_mask)
        np.testing.assert_allclose(np.asarray(got.weights), w, rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(np.asarray(got.kept), kept)
        if threshold is not None:
            assert 0 < kept.sum() < mask.any(-1).sum()  # the filter drops some, keeps some

    def test_is_sft_on_the_filtered_set(self):
        # ReST's BC with the token-mean reduction = the SFT trainer's loss on the kept samples.
        logps, mask, rewards = _samples(1)
        out = L.rest_bc_loss(*_f32(logps), jnp.asarray(mask), *_f32(rewards), threshold=0.5)
        kept = (rewards > 0.5) & mask.any(-1)
        want = -np.where(mask[kept], logps[kept], 0.0).sum() / mask[kept].sum()
        got = L.aggregate_loss(out.loss, out.mask, mode="bnpo")
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        sft = -L.masked_mean(jnp.asarray(logps[kept], jnp.float32), jnp.asarray(mask[kept]))
        assert float(got) == pytest.approx(float(sft), rel=1e-6)

    def test_hand_worked(self):
        logps = jnp.array([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -9.0]])
        mask = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
        rewards = jnp.array([0.9, 0.5, 0.8])
        out = L.rest_bc_loss(logps, mask, rewards, threshold=0.6)
        np.testing.assert_array_equal(out.loss, [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
        np.testing.assert_array_equal(out.kept, [1.0, 0.0, 1.0])
        # the threshold is strict: a reward equal to it is dropped
        assert float(L.rest_bc_loss(logps, mask, rewards, threshold=0.8).kept[2]) == 0.0
        # reward weights 0.9, 0.8
        out = L.rest_bc_loss(logps, mask, rewards, threshold=0.6, weighting="reward")
        np.testing.assert_allclose(out.loss, [[0.9, 1.8], [0.0, 0.0], [2.4, 0.0]], rtol=1e-6)
        # exp, beta 0.1: weights 2 e^9 / (e^9 + e^8) = 2 sigma(1) = 1.4621172, 2 sigma(-1)
        out = L.rest_bc_loss(logps, mask, rewards, threshold=0.6, weighting="exp",
                             temperature=0.1)
        np.testing.assert_allclose(out.weights, [1.4621172, 0.0, 0.5378828], rtol=1e-6)

    def test_masked_equals_sliced_and_zero_gradient_on_padding_and_dropped(self):
        logps, mask, rewards = _samples(2)
        kwargs = dict(threshold=0.3, weighting="exp", temperature=0.5)
        x = np.where(mask, logps, np.nan)
        out = L.rest_bc_loss(*_f32(x), jnp.asarray(mask), *_f32(rewards), **kwargs)
        # the batch without its padding row, each row cut to its length and right-padded again
        rows = mask.any(-1)
        sliced = L.rest_bc_loss(*_f32(logps[rows]), jnp.asarray(mask[rows]),
                                *_f32(rewards[rows]), **kwargs)
        np.testing.assert_allclose(np.asarray(out.loss)[rows], sliced.loss, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(out.weights)[rows], sliced.weights, rtol=1e-6)
        g = np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(L.rest_bc_loss(
            a, jnp.asarray(mask), *_f32(rewards), **kwargs).loss)))(*_f32(x)))
        kept = np.asarray(out.kept) > 0
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[~(mask & kept[:, None])], 0.0)
        np.testing.assert_allclose(g[mask & kept[:, None]],
                                   -np.broadcast_to(np.asarray(out.weights)[:, None],
                                                    g.shape)[mask & kept[:, None]], rtol=1e-6)

    def test_check_grads_nothing_kept_and_extremes(self):
        logps, mask, rewards = _samples(3, b=4, t=4)
        check_grads(jax.jit(lambda a: L.aggregate_loss(L.rest_bc_loss(
            a, jnp.asarray(mask), *_f32(rewards), weighting="reward").loss, jnp.asarray(mask),
            mode="bnpo")), _f32(logps), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
        # nothing passes the filter: zero loss, zero weights, finite zero gradient
        for weighting in L.REST_WEIGHTINGS:
            out = L.rest_bc_loss(*_f32(logps), jnp.asarray(mask), *_f32(rewards), threshold=2.0,
                                 weighting=weighting)
            np.testing.assert_array_equal(out.loss, 0.0)
            np.testing.assert_array_equal(out.weights, 0.0)
        # extreme log-probs and rewards (exp weights over rewards 1e4 apart, beta 1)
        x = np.array([[-1e4, -1e4], [-1e-6, -1e4], [-30.0, 0.0]], np.float32)
        m = np.ones_like(x, bool)
        r = np.array([1e4, 0.0, -1e4])
        for weighting in L.REST_WEIGHTINGS:
            got = jax.jit(lambda a, rr, w=weighting: L.rest_bc_loss(
                a, jnp.asarray(m), rr, weighting=w).loss)(*_f32(x, r))
            want = _np_rest(x, m, r, weighting=weighting)[0]
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
            g = jax.jit(jax.grad(lambda a, w=weighting: jnp.sum(L.rest_bc_loss(
                a, jnp.asarray(m), *_f32(r), weighting=w).loss)))(*_f32(x))
            assert np.all(np.isfinite(np.asarray(g)))

    def test_errors(self):
        z, m, r = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros(2)
        with pytest.raises(ValueError, match="weighting='rwr' is not supported.*'none', 'reward', 'exp'"):
            L.rest_bc_loss(z, m, r, weighting="rwr")
        with pytest.raises(ValueError, match="temperature must be > 0.0"):
            L.rest_bc_loss(z, m, r, weighting="exp", temperature=0.0)
        with pytest.raises(ValueError, match="temperature is only used by weighting='exp'"):
            L.rest_bc_loss(z, m, r, temperature=0.5)
        with pytest.raises(ValueError, match="rewards must have shape \\(2,\\)"):
            L.rest_bc_loss(z, m, jnp.zeros(3))
        with pytest.raises(AssertionError, match="`rewards` must have rank 1"):
            L.rest_bc_loss(z, m, jnp.zeros((2, 1)))
        with pytest.raises(AssertionError, match="mask=\\(2, 4\\)"):
            L.rest_bc_loss(z, jnp.ones((2, 4)), r)


# --------------------------------------------------------------------------------------------
# GOLD
# --------------------------------------------------------------------------------------------


class TestGOLD(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("seq", False, 0.2), ("token", True, 0.1), ("seq", True, 0.0))
    def test_matches_float64_reference(self, returns_kind, with_behaviour, u):
        logps, mask, rewards = _samples(4)
        rng = np.random.default_rng(4)
        returns = rewards if returns_kind == "seq" else rng.uniform(0.0, 2.0, logps.shape)
        behaviour = logps + rng.normal(0.0, 0.5, logps.shape) if with_behaviour else None
        got = self.variant(lambda x, m, q, bh: L.gold_loss(x, m, q, importance_logps=bh,
                                                           min_importance_weight=u))(
            *_f32(logps), jnp.asarray(mask), *_f32(returns, behaviour))
        want = _np_gold(logps, mask, returns, behaviour=behaviour, u=u)
        assert got.shape == logps.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    def test_hand_worked_and_the_weight_is_a_constant(self):
        # p = 0.5 (above u = 0.2) and p = e^-3 = 0.0498 (clipped to 0.2); return 2
        logps = jnp.array([[math.log(0.5), -3.0]])
        got = L.gold_loss(logps, jnp.ones((1, 2)), jnp.array([2.0]))
        np.testing.assert_allclose(got, [[0.5 * 2 * math.log(2.0), 0.2 * 2 * 3.0]], rtol=1e-6)
        # gradient: -max(p, u) * Q only (the importance weight is not differentiated)
        g = jax.grad(lambda a: jnp.sum(L.gold_loss(a, jnp.ones((1, 2)), jnp.array([2.0]))))(logps)
        np.testing.assert_allclose(g, [[-1.0, -0.4]], rtol=1e-6)

    def test_padding_zero_gradient_check_grads_and_extremes(self):
        logps, mask, rewards = _samples(5)
        x = np.where(mask, logps, np.nan)
        beh = np.where(mask, logps - 0.3, np.inf)
        g = jax.jit(jax.grad(lambda a, b: jnp.sum(L.gold_loss(a, jnp.asarray(mask), *_f32(rewards),
                                                              importance_logps=b)),
                             argnums=(0, 1)))(*_f32(x, beh))
        assert all(np.all(np.isfinite(np.asarray(v))) for v in g)
        np.testing.assert_array_equal(np.asarray(g[0])[~mask], 0.0)
        np.testing.assert_array_equal(np.asarray(g[1]), 0.0)  # importance weights: constants
        # (a fixed importance distribution: with the default, the weight is the same log-probs
        # with the gradient stopped, which finite differences do not see)
        fixed = jnp.asarray(logps - 0.2, jnp.float32)
        check_grads(jax.jit(lambda a: jnp.sum(L.gold_loss(a, jnp.asarray(mask), *_f32(rewards),
                                                          importance_logps=fixed))),
                    _f32(logps), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
        ext = np.array([[-1e4, -1e-7, 0.0], [-80.0, -1e4, -1e-3]], np.float32)
        q = np.array([1e3, -1e3])
        got = L.gold_loss(*_f32(ext), jnp.ones((2, 3)), *_f32(q))
        np.testing.assert_allclose(np.asarray(got), _np_gold(ext, np.ones((2, 3), bool), q),
                                   rtol=1e-6)
        assert np.all(np.isfinite(np.asarray(jax.grad(lambda a: jnp.sum(L.gold_loss(
            a, jnp.ones((2, 3)), *_f32(q))))(*_f32(ext)))))

    def test_errors(self):
        z, m = jnp.zeros((2, 3)), jnp.ones((2, 3))
        with pytest.raises(ValueError, match=r"min_importance_weight must be in \[0.0, 1.0\]"):
            L.gold_loss(z, m, jnp.zeros(2), min_importance_weight=1.5)
        with pytest.raises(ValueError, match="returns must have shape \\(2,\\) or \\(2, 3\\)"):
            L.gold_loss(z, m, jnp.zeros(3))
        with pytest.raises(AssertionError, match="returns=\\(2, 4\\)"):
            L.gold_loss(z, m, jnp.zeros((2, 4)))
        with pytest.raises(AssertionError, match="importance_logps=\\(2, 2\\)"):
            L.gold_loss(z, m, jnp.zeros(2), importance_logps=jnp.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# V-MPO
# --------------------------------------------------------------------------------------------


def _vmpo_inputs(seed, b=8):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-30.0, 5.0, b)
    adv = rng.normal(0.0, 1.0, b)
    mask = np.ones(b, bool)
    mask[[2, 5]] = False
    kl = np.abs(rng.normal(0.02, 0.01, b))
    return logps, adv, mask, kl


class TestVMPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.5, False, False), (0.25, True, False), (1.0, True, True))
    def test_matches_float64_reference(self, frac, masked, with_kl):
        logps, adv, mask, kl = _vmpo_inputs(0)
        mask = mask if masked else None
        kl_args = dict(kl=kl, alpha=0.7) if with_kl else {}

        def fn(logps, adv, eta, mask, kl, alpha):
            return L.vmpo_loss(logps, adv, eta, mask=mask, epsilon_temperature=0.05,
                               top_fraction=frac, kl=kl, kl_multiplier=alpha, epsilon_kl=0.02)

        got = self.variant(fn)(*_f32(logps, adv), jnp.float32(0.8),
                               None if mask is None else jnp.asarray(mask),
                               *_f32(kl if with_kl else None, 0.7 if with_kl else None))
        want = _np_vmpo(logps, adv, 0.8, mask=mask, eps_eta=0.05, frac=frac, eps_kl=0.02,
                        **kl_args)
        for field in ("policy_loss", "temperature_loss", "weights", "selected", "kl_loss",
                      "multiplier_loss"):
            value = getattr(got, field)
            assert value.dtype == jnp.float32, field
            np.testing.assert_allclose(np.asarray(value), want[field], rtol=2e-5, atol=2e-6,
                                       err_msg=field)
        assert got.temperature_loss.shape == () and got.policy_loss.shape == (8,)

    def test_hand_worked(self):
        # A = [1, 0, 2, -1], eta 1, top half: {A=1, A=2}; psi = sigma(-1), sigma(1);
        # M-step loss sum psi (-log pi) = 0.2689414 + 3 * 0.7310586 = 2.4621172 (mean of policy_loss)
        # temperature loss = 0.1 + log((e + e^2) / 2) = 1.7201144
        out = L.vmpo_loss(jnp.array([-1.0, -2.0, -3.0, -4.0]), jnp.array([1.0, 0.0, 2.0, -1.0]),
                          1.0)
        np.testing.assert_allclose(out.weights, [0.2689414, 0.0, 0.7310586, 0.0], atol=1e-6)
        assert float(jnp.mean(out.policy_loss)) == pytest.approx(2.4621172, abs=1e-6)
        assert float(out.temperature_loss) == pytest.approx(1.7201144, abs=1e-6)
        # ties at the cut-off are all selected: k = 2 but three advantages equal the cut-off
        out = L.vmpo_loss(jnp.zeros(4), jnp.array([1.0, 1.0, 1.0, 0.0]), 1.0)
        np.testing.assert_array_equal(out.selected, [1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(out.weights, [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)

    def test_temperature_gradient(self):
        # d L_eta / d eta = eps + log mean_S exp(A/eta) - sum_S psi A / eta
        logps, adv, mask, _ = _vmpo_inputs(1)
        eta = 0.6
        g = jax.grad(lambda e: L.vmpo_loss(*_f32(logps, adv), e, mask=jnp.asarray(mask))
                     .temperature_loss)(jnp.float32(eta))
        want = _np_vmpo(logps, adv, eta, mask=mask)
        sel = want["selected"] > 0
        s = adv[sel] / eta
        expected = 0.1 + np.logaddexp.reduce(s) - np.log(sel.sum()) - np.sum(
            want["weights"][sel] * adv[sel]) / eta
        assert float(g) == pytest.approx(expected, rel=1e-5)
        check_grads(jax.jit(lambda e: L.vmpo_loss(*_f32(logps, adv), e, mask=jnp.asarray(mask))
                            .temperature_loss), (jnp.float32(eta),), order=1, modes=["rev"],
                    atol=5e-2, rtol=5e-2)

    def test_policy_and_kl_gradients(self):
        logps, adv, mask, kl = _vmpo_inputs(2)

        def total(x, a, k, alpha):
            out = L.vmpo_loss(x, a, 1.0, mask=jnp.asarray(mask), kl=k, kl_multiplier=alpha)
            return L.masked_mean(out.policy_loss + out.kl_loss + out.multiplier_loss,
                                 jnp.asarray(mask))

        gx, ga, gk, galpha = jax.grad(total, argnums=(0, 1, 2, 3))(*_f32(logps, adv, kl),
                                                                  jnp.float32(0.5))
        want = _np_vmpo(logps, adv, 1.0, mask=mask)
        np.testing.assert_allclose(gx, -want["weights"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(ga, 0.0)  # advantages are fixed targets
        np.testing.assert_allclose(gk, np.where(mask, 0.5 / mask.sum(), 0.0), rtol=1e-6)
        assert float(galpha) == pytest.approx(float(np.mean(0.01 - kl[mask])), rel=1e-5)

    def test_masked_equals_sliced_with_zero_gradient(self):
        logps, adv, mask, kl = _vmpo_inputs(3)
        x, a, k = (np.where(mask, v, np.nan) for v in (logps, adv, kl))
        out = L.vmpo_loss(*_f32(x, a), 0.7, mask=jnp.asarray(mask), kl=jnp.asarray(k, jnp.float32),
                          kl_multiplier=0.3)
        sliced = L.vmpo_loss(*_f32(logps[mask], adv[mask]), 0.7,
                             kl=jnp.asarray(kl[mask], jnp.float32), kl_multiplier=0.3)
        for field in ("policy_loss", "weights", "selected", "kl_loss", "multiplier_loss"):
            v = np.asarray(getattr(out, field))
            np.testing.assert_allclose(v[mask], getattr(sliced, field), rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(v[~mask], 0.0)
        assert float(out.temperature_loss) == pytest.approx(float(sliced.temperature_loss))
        grads = jax.jit(jax.grad(lambda *v: jnp.sum(sum(jnp.sum(t) for t in L.vmpo_loss(
            v[0], v[1], v[3], mask=jnp.asarray(mask), kl=v[2], kl_multiplier=0.3)[:4])),
            argnums=(0, 1, 2, 3)))(*_f32(x, a, k), jnp.float32(0.7))
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
        for g in grads[:3]:
            np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)

    def test_nothing_valid_and_extremes(self):
        out = L.vmpo_loss(jnp.zeros(3), jnp.ones(3), 1.0, mask=jnp.zeros(3))
        assert float(out.temperature_loss) == 0.0
        np.testing.assert_array_equal(out.policy_loss, 0.0)
        g = jax.grad(lambda e: L.vmpo_loss(jnp.zeros(3), jnp.ones(3), e, mask=jnp.zeros(3))
                     .temperature_loss)(1.0)
        assert float(g) == 0.0
        # advantages 1e4 apart at eta 0.01 (A / eta = 1e6): one-hot weights, finite everything
        logps = np.array([-1e4, -1.0, -50.0, -3.0])
        adv = np.array([1e4, -1e4, 0.0, 5e3])
        for eta in (0.01, 1e3):
            got = L.vmpo_loss(*_f32(logps, adv), eta, top_fraction=1.0)
            want = _np_vmpo(logps, adv, eta, frac=1.0)
            np.testing.assert_allclose(np.asarray(got.weights), want["weights"], atol=1e-6)
            assert float(got.temperature_loss) == pytest.approx(want["temperature_loss"], rel=1e-5)
            grads = jax.jit(jax.grad(lambda x, e: jnp.mean(L.vmpo_loss(x, *_f32(adv), e, top_fraction=1.0)
                                                   .policy_loss) + L.vmpo_loss(
                x, *_f32(adv), e, top_fraction=1.0).temperature_loss, argnums=(0, 1)))(
                *_f32(logps), jnp.float32(eta))
            assert all(np.all(np.isfinite(np.asarray(v))) for v in grads)

    def test_sharded_batch_matches_single_device(self):
        logps, adv, mask, kl = _vmpo_inputs(4)
        fn = jax.jit(lambda x, a, m: L.vmpo_loss(x, a, 0.9, mask=m))
        args = (*_f32(logps, adv), jnp.asarray(mask))
        want = fn(*args)
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        got = fn(*(jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for v in args))
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)

    def test_errors(self):
        x, a = jnp.zeros(4), jnp.zeros(4)
        for kwargs, match in [
            (dict(epsilon_temperature=0.0), "epsilon_temperature must be > 0.0"),
            (dict(top_fraction=0.0), r"top_fraction must be in \(0.0, 1.0\]"),
            (dict(top_fraction=1.5), "top_fraction must be"),
            (dict(epsilon_kl=-1.0), "epsilon_kl must be"),
            (dict(kl=jnp.zeros(4)), "pass kl and kl_multiplier together"),
            (dict(kl_multiplier=1.0), "pass kl and kl_multiplier together"),
            (dict(kl=jnp.zeros(4), kl_multiplier=0.0), "kl_multiplier must be > 0.0"),
        ]:
            with pytest.raises(ValueError, match=match):
                L.vmpo_loss(x, a, 1.0, **kwargs)
        with pytest.raises(ValueError, match="temperature must be > 0.0"):
            L.vmpo_loss(x, a, 0.0)
        with pytest.raises(ValueError, match="temperature must be"):
            L.vmpo_loss(x, a, jnp.float32(-1.0))
        with pytest.raises(AssertionError, match="`temperature` must have rank 0"):
            L.vmpo_loss(x, a, jnp.ones(4))
        with pytest.raises(AssertionError, match="advantages=\\(3,\\)"):
            L.vmpo_loss(x, jnp.zeros(3), 1.0)
        with pytest.raises(AssertionError, match="`sequence_logps` must have rank 1"):
            L.vmpo_loss(jnp.zeros((4, 2)), jnp.zeros((4, 2)), 1.0)
