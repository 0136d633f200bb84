"""Reference-free (CPO with every loss type and AlphaPO, SimPO, ORPO) and unpaired (KTO with its
reference point) preference losses against float64 NumPy references written from TRL 1.16's
``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss`` and ``KTOTrainer`` loss code, the full
objectives composed from logits (behaviour-cloning / NLL terms), hand-worked values, gradients
and extreme inputs."""

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

# --------------------------------------------------------------------------------------------
# float64 NumPy references (TRL 1.16 formulas)
# --------------------------------------------------------------------------------------------


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sig(x):
    return np.exp(_logsig(x))


def _np_cpo(pc, pr, *, beta, loss_type, eps=0.0, gamma=0.5, alpha=0.0):
    """`CPOTrainer.cpo_loss` per pair; AlphaPO reward r = (1 - p^-alpha) / alpha, p = e^logp."""
    pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
    if alpha != 0.0:
        pc = (1.0 - np.power(np.exp(pc), -alpha)) / alpha
        pr = (1.0 - np.power(np.exp(pr), -alpha)) / alpha
    logits = pc - pr
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(loss_type)


def _np_log1mexp(x):
    """log(1 - e^x) in float64, directly (x < 0)."""
    return np.log(-np.expm1(np.asarray(x, np.float64)))


def _np_orpo_ratio(pc, pr, *, beta):
    """`ORPOTrainer.odds_ratio_loss`'s `losses` = beta * log sigma(log odds ratio); the trainer
    minimises `nll - losses.mean()`."""
    pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
    log_odds = (pc - pr) - (_np_log1mexp(pc) - _np_log1mexp(pr))
    return beta * _logsig(log_odds)


def _np_kto_kl(kl_logps, ref_kl_logps):
    """`KTOTrainer`: kl = (KL_logps - ref_KL_logps).mean().clamp(min=0) (no gradient)."""
    return max(float(np.mean(np.asarray(kl_logps, np.float64) - ref_kl_logps)), 0.0)


def _np_kto_trl(logps, ref, label, *, kl, beta, wd=1.0, wu=1.0, loss_type="kto"):
    """`KTOTrainer._compute_loss`: desirable examples first, then undesirable ones, weighted and
    concatenated; the trainer's loss is the mean of that vector. Returns (losses, order)."""
    logps, ref = np.asarray(logps, np.float64), np.asarray(ref, np.float64)
    chosen_idx = np.nonzero(label > 0)[0]
    rejected_idx = np.nonzero(label <= 0)[0]
    chosen = logps[chosen_idx] - ref[chosen_idx]
    rejected = logps[rejected_idx] - ref[rejected_idx]
    if loss_type == "kto":
        chosen_losses = 1 - _sig(beta * (chosen - kl))
        rejected_losses = 1 - _sig(beta * (kl - rejected))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - _sig(beta * chosen)
        rejected_losses = _sig(beta * rejected)
    else:
        raise ValueError(loss_type)
    losses = np.concatenate([wd * chosen_losses, wu * rejected_losses])
    return losses, np.concatenate([chosen_idx, rejected_idx])


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _np_batch_logps(logits, labels, *, average):
    """`get_batch_logps` of the CPO/ORPO trainers (decoder-only: shifts inside, -100 ignored)."""
    labels, logits = labels[:, 1:], logits[:, :-1]
    mask = labels != -100
    tok = np.take_along_axis(_np_log_softmax(logits), np.where(mask, labels, 0)[..., None], -1)
    total = (tok[..., 0] * mask).sum(-1)
    return total / mask.sum(-1) if average else total


def _np_cross_entropy(logits, labels):
    """`nn.CrossEntropyLoss()` on shifted logits/labels: token mean over non -100 labels."""
    labels, logits = labels[:, 1:], logits[:, :-1]
    mask = labels != -100
    tok = np.take_along_axis(_np_log_softmax(logits), np.where(mask, labels, 0)[..., None], -1)
    return -(tok[..., 0] * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _avg_logps(seed, n=8):
    """Length-averaged log-probs (as ipo / simpo / ORPO / AlphaPO are fed)."""
    rng = np.random.default_rng(seed)
    return -np.abs(rng.normal(1.5, 0.6, n)) - 0.05, -np.abs(rng.normal(1.5, 0.6, n)) - 0.05


def _sum_logps(seed, n=8):
    """Summed sequence log-probs (as sigmoid / hinge CPO and KTO are fed)."""
    rng = np.random.default_rng(seed)
    return rng.normal(-40.0, 8.0, n), rng.normal(-40.0, 8.0, n)


def _token_batch(seed, b=3, t=7, v=11):
    """Logits and TRL-style labels (-100 on the prompt and padding) for chosen and rejected."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(2 * b, t, v))
    ids = rng.integers(0, v, size=(2 * b, t))
    attention = np.ones((2 * b, t), bool)
    labels = ids.copy()
    prompt_len = rng.integers(1, 3, size=2 * b)
    end = rng.integers(t - 3, t + 1, size=2 * b)
    for i in range(2 * b):
        labels[i, : prompt_len[i]] = -100
        labels[i, end[i]:] = -100
        attention[i, end[i]:] = False
    return logits, ids, labels, attention


def _jax_token_logps(logits, ids):
    """Per-token log-probs in rlhf_jax's shifted convention: [N, T - 1]."""
    return L.token_logps(logits[:, :-1], ids[:, 1:])


LARGE = np.array([-1e4, -1e-3, -50.0, -1e4, 0.0, -1e4], np.float32)
SMALL = np.array([-1e-3, -1e4, -50.0, -1e4, -1e4, 0.0], np.float32)


# --------------------------------------------------------------------------------------------
# CPO
# --------------------------------------------------------------------------------------------


class TestCPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=L.CPO_LOSS_TYPES, alpha=[0.0, 0.25])
    def test_matches_trl(self, loss_type, alpha):
        # TRL averages log-probs for ipo / simpo and sums them otherwise; AlphaPO on averages
        averaged = loss_type in ("ipo", "simpo") or alpha != 0.0
        pc, pr = _avg_logps(0) if averaged else _sum_logps(0)
        eps = 0.15 if loss_type in ("sigmoid", "simpo") else 0.0
        beta = 0.7 if averaged else 0.1
        fn = self.variant(lambda a, b: L.cpo_loss(a, b, beta=beta, loss_type=loss_type,
                                               label_smoothing=eps, simpo_gamma=0.3,
                                               alpha=alpha))
        got = fn(*_f32(pc, pr))
        want = _np_cpo(pc, pr, beta=beta, loss_type=loss_type, eps=eps, gamma=0.3, alpha=alpha)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    def test_hinge_inputs_cover_both_sides_of_the_kink(self):
        pc, pr = _sum_logps(0)
        losses = _np_cpo(pc, pr, beta=0.1, loss_type="hinge")
        assert np.any(losses == 0.0) and np.any(losses > 0.0)

    def test_hand_worked(self):
        pc, pr = jnp.array([-1.0]), jnp.array([-3.0])  # Delta = 2
        # sigmoid, beta 0.5: -log sigma(1) = log(1 + e^-1) = 0.3132617
        assert float(L.cpo_loss(pc, pr, beta=0.5)[0]) == pytest.approx(0.3132617, abs=1e-6)
        # sigmoid, eps 0.2: 0.8 log(1 + e^-1) + 0.2 log(1 + e) = 0.250609 + 0.262652 = 0.513261
        got = L.cpo_loss(pc, pr, beta=0.5, label_smoothing=0.2)
        assert float(got[0]) == pytest.approx(0.8 * 0.3132617 + 0.2 * 1.3132617, abs=1e-6)
        # hinge: max(0, 1 - 0.5 * 2) = 0; beta 0.25: 1 - 0.5 = 0.5
        assert float(L.cpo_loss(pc, pr, beta=0.5, loss_type="hinge")[0]) == 0.0
        assert float(L.cpo_loss(pc, pr, beta=0.25, loss_type="hinge")[0]) == pytest.approx(0.5)
        # ipo: (2 - 1 / (2 * 0.5))^2 = 1; beta 1: (2 - 0.5)^2 = 2.25
        assert float(L.cpo_loss(pc, pr, beta=0.5, loss_type="ipo")[0]) == pytest.approx(1.0)
        assert float(L.cpo_loss(pc, pr, beta=1.0, loss_type="ipo")[0]) == pytest.approx(2.25)
        # simpo, gamma 0.5: z = 0.5 * (2 - 0.5 / 0.5) = 0.5: log(1 + e^-0.5) = 0.4740770
        got = L.cpo_loss(pc, pr, beta=0.5, loss_type="simpo", simpo_gamma=0.5)
        assert float(got[0]) == pytest.approx(0.4740770, abs=1e-6)
        # AlphaPO, alpha 1: u(l) = 1 - e^-l; u(-1) - u(-3) = e^3 - e = 17.367255; beta 0.05:
        # z = 0.868363, log(1 + e^-z) = 0.350193
        got = L.cpo_loss(pc, pr, beta=0.05, alpha=1.0)
        z = 0.05 * (math.exp(3) - math.exp(1))
        assert z == pytest.approx(0.868363, abs=1e-6)
        assert float(got[0]) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)

    def test_per_pair_label_smoothing(self):
        pc, pr = _sum_logps(3, n=3)
        eps = np.array([0.0, 0.2, 0.5])
        got = L.cpo_loss(*_f32(pc, pr), beta=0.1, label_smoothing=jnp.asarray(eps))
        want = _np_cpo(pc, pr, beta=0.1, loss_type="sigmoid", eps=eps)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    @parameterized.parameters(("sigmoid", 1.0), ("ipo", 0.5), ("simpo", 0.0))
    def test_full_objective_with_behaviour_cloning_matches_trl(self, loss_type, cpo_alpha):
        # TRL: loss = cpo_loss(...).mean() + cpo_alpha * CrossEntropy(chosen logits, labels),
        # the cross-entropy a token mean over every chosen completion token of the batch.
        logits, ids, labels, _ = _token_batch(1)
        b = logits.shape[0] // 2
        average = loss_type in ("ipo", "simpo")
        logps = _np_batch_logps(logits, labels, average=average)
        want = (np.mean(_np_cpo(logps[:b], logps[b:], beta=0.2, loss_type=loss_type))
                + cpo_alpha * _np_cross_entropy(logits[:b], labels[:b]))

        @jax.jit
        def objective(logits, ids, mask):
            tok = _jax_token_logps(logits, ids)
            seq = L.sequence_logps(tok, mask, average=average)
            pref = L.cpo_loss(seq[:b], seq[b:], beta=0.2, loss_type=loss_type)
            nll = -L.masked_mean(tok[:b], mask[:b])
            return jnp.mean(pref) + cpo_alpha * nll

        mask = jnp.asarray(labels[:, 1:] != -100)
        got = objective(*_f32(logits), jnp.asarray(ids), mask)
        assert float(got) == pytest.approx(float(want), rel=2e-5)

    def test_check_grads(self):
        for loss_type in L.CPO_LOSS_TYPES:
            for alpha in (0.0, 0.25):
                pc, pr = _f32(*_avg_logps(1, n=4))
                check_grads(lambda a, b, t=loss_type, al=alpha: jnp.sum(
                    L.cpo_loss(a, b, beta=0.5, loss_type=t, label_smoothing=0.1, alpha=al)),
                    (pc, pr), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)

    @parameterized.parameters(*L.CPO_LOSS_TYPES)
    def test_finite_values_and_gradients_at_extreme_inputs(self, loss_type):
        value, grads = jax.value_and_grad(
            lambda a, b: jnp.sum(L.cpo_loss(a, b, beta=1.0, loss_type=loss_type,
                                            label_smoothing=0.1)), argnums=(0, 1))(
            jnp.asarray(LARGE), jnp.asarray(SMALL))
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        if loss_type in ("sigmoid", "simpo"):
            # float32 result still equals the float64 reference at |beta * Delta| = 1e4
            want = _np_cpo(LARGE, SMALL, beta=1.0, loss_type=loss_type, eps=0.1)
            got = L.cpo_loss(*_f32(LARGE, SMALL), beta=1.0, loss_type=loss_type,
                             label_smoothing=0.1)
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-5)

    def test_each_pair_only_gets_its_own_gradient(self):
        pc, pr = _f32(*_avg_logps(2, n=4))
        jac = jax.jacrev(lambda a: L.cpo_loss(a, pr, beta=0.5))(pc)
        np.testing.assert_array_equal(np.asarray(jac) * (1 - np.eye(4)), 0.0)
        assert np.all(np.diag(np.asarray(jac)) < 0)  # raising chosen log-probs lowers the loss

    def test_dtype_and_shape(self):
        pc, pr = _avg_logps(4, n=5)
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            got = L.cpo_loss(jnp.asarray(pc, dtype), jnp.asarray(pr, dtype), loss_type="ipo")
            assert got.shape == (5,) and got.dtype == jnp.float32

    def test_errors(self):
        with pytest.raises(ValueError, match="loss_type='kto'.*'sigmoid', 'hinge', 'ipo'"):
            L.cpo_loss(jnp.zeros(2), jnp.zeros(2), loss_type="kto")
        with pytest.raises(AssertionError, match="policy_rejected_logps=\\(3,\\)"):
            L.cpo_loss(jnp.zeros(2), jnp.zeros(3))
        with pytest.raises(AssertionError, match="`policy_chosen_logps` must have rank 1"):
            L.cpo_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------------


class TestSimPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_trl_cpo_simpo(self):
        pc, pr = _avg_logps(2)
        got = self.variant(lambda a, b: L.simpo_loss(a, b, beta=2.0, gamma=0.5,
                                                  label_smoothing=0.1))(*_f32(pc, pr))
        want = _np_cpo(pc, pr, beta=2.0, loss_type="simpo", eps=0.1, gamma=0.5)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)

    def test_is_cpo_simpo(self):
        pc, pr = _f32(*_avg_logps(3))
        np.testing.assert_array_equal(
            L.simpo_loss(pc, pr, beta=1.5, gamma=0.8, label_smoothing=0.05),
            L.cpo_loss(pc, pr, beta=1.5, loss_type="simpo", simpo_gamma=0.8,
                       label_smoothing=0.05))

    def test_hand_worked(self):
        # average log-probs -0.5 and -1.0, beta 2, gamma 0.5: z = 2 * 0.5 - 0.5 = 0.5
        # loss = log(1 + e^-0.5) = 0.4740770; eps 0.2: 0.8 * 0.474077 + 0.2 * 0.974077 = 0.574077
        pc, pr = jnp.array([-0.5]), jnp.array([-1.0])
        assert float(L.simpo_loss(pc, pr)[0]) == pytest.approx(0.4740770, abs=1e-6)
        got = L.simpo_loss(pc, pr, beta=2.0, gamma=0.5, label_smoothing=0.2)
        assert float(got[0]) == pytest.approx(0.5740770, abs=1e-6)

    def test_check_grads(self):
        pc, pr = _f32(*_avg_logps(4, n=4))
        check_grads(lambda a, b: jnp.sum(L.simpo_loss(a, b, beta=2.0, label_smoothing=0.1)),
                    (pc, pr), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------------
# ORPO
# --------------------------------------------------------------------------------------------


class TestORPO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_trl(self):
        # average log-probs on both sides of log1mexp's branch point -log 2
        pc = np.array([-0.05, -0.4, -0.69, -0.7, -1.2, -3.0, -8.0, -20.0])
        pr = np.array([-0.9, -0.1, -2.0, -0.3, -0.69, -5.0, -1.0, -0.01])
        got = self.variant(lambda a, b: L.orpo_loss(a, b, beta=0.2))(*_f32(pc, pr))
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), -_np_orpo_ratio(pc, pr, beta=0.2),
                                   rtol=2e-5, atol=2e-6)

    def test_hand_worked(self):
        # p_c = 1/2, p_r = 1/4: odds 1 and 1/3, log odds ratio = log 3, sigma(log 3) = 3/4;
        # beta 0.1: -0.1 log(3/4) = 0.0287682
        got = L.orpo_loss(jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)]), beta=0.1)
        assert float(got[0]) == pytest.approx(0.0287682, abs=1e-7)
        # equal log-probs: log odds ratio 0, -beta log(1/2) = beta log 2
        got = L.orpo_loss(jnp.array([-0.3]), jnp.array([-0.3]), beta=0.5)
        assert float(got[0]) == pytest.approx(0.5 * math.log(2.0), abs=1e-7)

    def test_full_objective_matches_trl(self):
        # TRL: loss = nll(chosen prompt + completion, attention mask) - mean(beta * log sigma(.))
        # with the odds computed from completion-only length-averaged log-probs.
        logits, ids, labels, attention = _token_batch(5)
        b = logits.shape[0] // 2
        logps = _np_batch_logps(logits, labels, average=True)
        nll_labels = np.where(attention, ids, -100)
        want = (_np_cross_entropy(logits[:b], nll_labels[:b])
                - np.mean(_np_orpo_ratio(logps[:b], logps[b:], beta=0.1)))

        @jax.jit
        def objective(logits, ids, completion_mask, attention_mask):
            tok = _jax_token_logps(logits, ids)
            seq = L.sequence_logps(tok, completion_mask, average=True)
            nll = -L.masked_mean(tok[:b], attention_mask[:b])
            return nll + jnp.mean(L.orpo_loss(seq[:b], seq[b:], beta=0.1))

        got = objective(*_f32(logits), jnp.asarray(ids), jnp.asarray(labels[:, 1:] != -100),
                        jnp.asarray(attention[:, 1:]))
        assert float(got) == pytest.approx(float(want), rel=2e-5)

    def test_near_zero_and_very_negative_logps(self):
        # log(1 - e^x) -> -inf as x -> 0^-: values and gradients stay finite at x = 0, and
        # match float64 wherever float32 can represent 1 - e^x (x <= -1e-6).
        pc = np.array([-1e-6, -1e-4, -1e4, -1e4, -1e-5, -30.0], np.float32)
        pr = np.array([-1e4, -1e-3, -1e-6, -1e4, -1e-4, -1e4], np.float32)
        got = L.orpo_loss(*_f32(pc, pr), beta=0.5)
        np.testing.assert_allclose(np.asarray(got), -_np_orpo_ratio(pc, pr, beta=0.5),
                                   rtol=1e-4, atol=1e-5)
        edge_c = jnp.array([0.0, -1e-9, -1e4, 0.0, -1e-30, -1e4], jnp.float32)
        edge_r = jnp.array([-1e4, 0.0, -1e-9, 0.0, -1e4, -1e4], jnp.float32)
        for fn in (L.orpo_loss, jax.jit(L.orpo_loss)):
            value, grads = jax.value_and_grad(lambda a, b, f=fn: jnp.sum(f(a, b)),
                                              argnums=(0, 1))(edge_c, edge_r)
            assert np.isfinite(float(value))
            assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        # a near-certain chosen completion against a near-impossible rejected one: loss ~ 0
        assert float(L.orpo_loss(edge_c[:1], edge_r[:1])[0]) == pytest.approx(0.0, abs=1e-6)
        # and the reverse: loss ~ beta * |log odds ratio| = 0.1 * (1e4 + log(1e9)) ~ 1e3
        assert float(L.orpo_loss(edge_c[2:3], edge_r[2:3])[0]) > 900.0

    def test_check_grads(self):
        pc, pr = _f32(*_avg_logps(4, n=4))
        check_grads(lambda a, b: jnp.sum(L.orpo_loss(a, b, beta=0.5)), (pc, pr), order=1,
                    modes=["rev"], atol=5e-2, rtol=5e-2)

    def test_dtype_and_errors(self):
        got = L.orpo_loss(jnp.full(3, -0.5, jnp.bfloat16), jnp.full(3, -1.0, jnp.bfloat16))
        assert got.shape == (3,) and got.dtype == jnp.float32
        with pytest.raises(AssertionError, match="policy_rejected_logps=\\(3,\\)"):
            L.orpo_loss(jnp.zeros(2), jnp.zeros(3))
        with pytest.raises(AssertionError, match="`policy_chosen_logps` must have rank 1"):
            L.orpo_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)))


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def _kto_batch(seed, n=8):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-40.0, 8.0, n)
    ref = logps + rng.normal(0.0, 4.0, n)
    kl_p = rng.normal(-45.0, 8.0, n)
    kl_r = kl_p - rng.normal(0.5, 1.0, n)
    label = np.array([1, 0, 1, 1, 0, 0, 1, 0] * (n // 8 + 1))[:n].astype(np.float32)
    return logps, ref, kl_p, kl_r, label


class TestKTO(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*L.KTO_LOSS_TYPES)
    def test_matches_trl(self, loss_type):
        logps, ref, kl_p, kl_r, label = _kto_batch(5)
        # TRL computes no KL term for apo_zero_unpaired (kl = 0)
        kl = _np_kto_kl(kl_p, kl_r) if loss_type == "kto" else 0.0
        assert kl > 0.0 or loss_type != "kto"

        def fn(logps, ref, label, kl_p, kl_r):
            z0 = L.kto_reference_kl(kl_p, kl_r) if loss_type == "kto" else 0.0
            return L.kto_loss(logps, ref, label, reference_kl=z0, beta=0.2,
                              desirable_weight=1.33, undesirable_weight=0.5,
                              loss_type=loss_type)

        got = self.variant(fn)(*_f32(logps, ref, label, kl_p, kl_r))
        want, order = _np_kto_trl(logps, ref, label, kl=kl, beta=0.2, wd=1.33, wu=0.5,
                                  loss_type=loss_type)
        assert got.shape == (8,) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got)[order], want, rtol=2e-5, atol=2e-6)
        assert float(jnp.mean(got)) == pytest.approx(float(np.mean(want)), rel=2e-5)

    def test_hand_worked(self):
        # rho = -1 - (-3) = 2, z0 = 1, beta = 1, lambda_D = 2, lambda_U = 0.5:
        # desirable 2 (1 - sigma(1)) = 0.5378828; undesirable 0.5 (1 - sigma(-1)) = 0.3655293
        args = (jnp.array([-1.0, -1.0]), jnp.array([-3.0, -3.0]), jnp.array([1.0, 0.0]))
        got = L.kto_loss(*args, reference_kl=1.0, beta=1.0, desirable_weight=2.0,
                         undesirable_weight=0.5)
        np.testing.assert_allclose(got, [0.5378828, 0.3655293], atol=1e-6)
        # apo_zero_unpaired: 2 (1 - sigma(2)) = 0.2384058; 0.5 sigma(2) = 0.4403985
        got = L.kto_loss(*args, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5,
                         loss_type="apo_zero_unpaired")
        np.testing.assert_allclose(got, [0.2384058, 0.4403985], atol=1e-6)

    def test_apo_zero_unpaired_ignores_the_reference_point(self):
        logps, ref, _, _, label = _kto_batch(6)
        args = _f32(logps, ref, label)
        np.testing.assert_array_equal(
            L.kto_loss(*args, reference_kl=3.0, loss_type="apo_zero_unpaired"),
            L.kto_loss(*args, reference_kl=0.0, loss_type="apo_zero_unpaired"))

    def test_weights_act_on_their_own_side_only(self):
        logps, ref, _, _, label = _kto_batch(7)
        args = _f32(logps, ref, label)
        base = np.asarray(L.kto_loss(*args, reference_kl=0.4))
        up_d = np.asarray(L.kto_loss(*args, reference_kl=0.4, desirable_weight=3.0))
        up_u = np.asarray(L.kto_loss(*args, reference_kl=0.4, undesirable_weight=3.0))
        d = label > 0
        np.testing.assert_allclose(up_d[d], 3.0 * base[d], rtol=1e-6)
        np.testing.assert_array_equal(up_d[~d], base[~d])
        np.testing.assert_allclose(up_u[~d], 3.0 * base[~d], rtol=1e-6)
        np.testing.assert_array_equal(up_u[d], base[d])

    def test_labels_bool_or_soft(self):
        logps, ref, _, _, label = _kto_batch(8)
        x, r = _f32(logps, ref)
        np.testing.assert_array_equal(
            L.kto_loss(x, r, jnp.asarray(label > 0), reference_kl=0.2),
            L.kto_loss(x, r, jnp.asarray(label), reference_kl=0.2))
        d = L.kto_loss(x, r, jnp.ones(8), reference_kl=0.2, desirable_weight=1.5)
        u = L.kto_loss(x, r, jnp.zeros(8), reference_kl=0.2, desirable_weight=1.5)
        p = jnp.linspace(0.0, 1.0, 8)
        mixed = L.kto_loss(x, r, p, reference_kl=0.2, desirable_weight=1.5)
        np.testing.assert_allclose(mixed, p * d + (1 - p) * u, rtol=1e-6, atol=1e-7)

    def test_gradients_flow_per_example_and_not_through_the_reference_point(self):
        logps, ref, kl_p, kl_r, label = _kto_batch(9, n=6)
        x, r, kp, kr, lab = _f32(logps, ref, kl_p, kl_r, label)

        def per_example(x, kp):
            return L.kto_loss(x, r, lab, reference_kl=L.kto_reference_kl(kp, kr), beta=0.3)

        jac_x, jac_kl = jax.jacrev(per_example, argnums=(0, 1))(x, kp)
        np.testing.assert_array_equal(np.asarray(jac_x) * (1 - np.eye(6)), 0.0)
        np.testing.assert_array_equal(jac_kl, 0.0)
        # d/d rho: desirable -beta s(1-s) < 0, undesirable +beta s(1-s) > 0 (s at the example)
        diag = np.diag(np.asarray(jac_x))
        assert np.all(diag[label > 0] < 0) and np.all(diag[label == 0] > 0)
        rho, z0 = logps - ref, _np_kto_kl(kl_p, kl_r)
        s = _sig(0.3 * (rho - z0))
        want = np.where(label > 0, -0.3 * s * (1 - s), 0.3 * s * (1 - s))
        np.testing.assert_allclose(diag, want, rtol=1e-4, atol=1e-7)

    def test_check_grads(self):
        logps, ref, _, _, label = _kto_batch(10, n=4)
        x, r, lab = _f32(logps / 10, ref / 10, label)
        for loss_type in L.KTO_LOSS_TYPES:
            check_grads(lambda a, b, t=loss_type: jnp.sum(L.kto_loss(
                a, b, lab, beta=0.5, reference_kl=0.2, desirable_weight=1.2,
                undesirable_weight=0.7, loss_type=t)),
                (x, r), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)

    @parameterized.parameters(*L.KTO_LOSS_TYPES)
    def test_finite_at_extreme_inputs(self, loss_type):
        logps = jnp.array([1e4, -1e4, 0.0, -1e4, -1e4, 0.0], jnp.float32)
        ref = jnp.array([-1e4, 1e4, -1e4, 0.0, -1e4, 0.0], jnp.float32)
        label = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 1.0])
        value, grads = jax.value_and_grad(
            lambda a, b: jnp.sum(L.kto_loss(a, b, label, reference_kl=1e4, beta=1.0,
                                            loss_type=loss_type)), argnums=(0, 1))(logps, ref)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)

    def test_dtype_and_errors(self):
        got = L.kto_loss(jnp.zeros(3, jnp.bfloat16), jnp.zeros(3, jnp.float16), jnp.ones(3, bool))
        assert got.shape == (3,) and got.dtype == jnp.float32
        with pytest.raises(ValueError, match="loss_type='sigmoid'.*'kto', 'apo_zero_unpaired'"):
            L.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), loss_type="sigmoid")
        with pytest.raises(AssertionError, match="label=\\(3,\\)"):
            L.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(3))
        with pytest.raises(AssertionError, match="`policy_logps` must have rank 1"):
            L.kto_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)))


class TestKTOReferenceKL(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.5, -0.5)
    def test_matches_trl(self, shift):
        rng = np.random.default_rng(11)
        kl_logps = rng.normal(-20.0, 1.0, 6)
        kl_ref = kl_logps - shift + rng.normal(0.0, 0.1, 6)
        got = self.variant(L.kto_reference_kl)(*_f32(kl_logps, kl_ref))
        want = _np_kto_kl(kl_logps, kl_ref)
        assert (want > 0.0) == (shift > 0.0)
        assert got.shape == () and got.dtype == jnp.float32
        assert float(got) == pytest.approx(want, abs=1e-5)

    def test_hand_worked_clamp_and_stop_gradient(self):
        # mean([1, -3]) = -1 -> clamped to 0; mean([1, 3]) = 2
        assert float(L.kto_reference_kl(jnp.array([1.0, -3.0]), jnp.zeros(2))) == 0.0
        assert float(L.kto_reference_kl(jnp.array([1.0, 3.0]), jnp.zeros(2))) == 2.0
        g = jax.grad(lambda a, b: L.kto_reference_kl(a, b), argnums=(0, 1))(
            jnp.array([1.0, 3.0]), jnp.zeros(2))
        np.testing.assert_array_equal(g[0], 0.0)
        np.testing.assert_array_equal(g[1], 0.0)

    def test_axis_name_gives_the_global_mean_under_vmap_and_shard_map(self):
        rng = np.random.default_rng(12)
        a, b = rng.normal(size=(8, 3)), rng.normal(size=(8, 3)) - 0.5
        # TRL averages equal-sized per-device means, which is the global mean
        want = max(float(np.mean(np.mean(a - b, axis=1))), 0.0)
        assert want == pytest.approx(_np_kto_kl(a.ravel(), b.ravel()))
        per_device = jax.vmap(lambda x, y: L.kto_reference_kl(x, y, axis_name="d"),
                              axis_name="d")(*_f32(a, b))
        np.testing.assert_allclose(per_device, np.full(8, want), atol=1e-6)
        mesh = jax.make_mesh((8,), ("d",))
        sharded = jax.jit(jax.shard_map(
            lambda x, y: L.kto_reference_kl(x, y, axis_name="d")[None],
            mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
        got = sharded(*(jax.device_put(x, NamedSharding(mesh, P("d")))
                        for x in _f32(a.ravel(), b.ravel())))
        np.testing.assert_allclose(got, np.full(8, want), atol=1e-6)

    def test_errors(self):
        with pytest.raises(AssertionError, match="`kl_policy_logps` must have rank 1"):
            L.kto_reference_kl(jnp.zeros((2, 1)), jnp.zeros((2, 1)))
        with pytest.raises(AssertionError, match="kl_ref_logps=\\(3,\\)"):
            L.kto_reference_kl(jnp.zeros(2), jnp.zeros(3))
