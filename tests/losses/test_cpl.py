"""Contrastive Preference Learning (`cpl_loss`) against a float64 NumPy reference written from the
paper's equations, against the reference code's `biased_bce_with_logits` and BC term
(github.com/jhejna/cpl, `research/algs/cpl.py`), hand-worked values, the DPO / CPO special
cases, masks, gradients and extreme inputs."""

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


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def _np_advantage(logps, mask, ref, *, alpha, gamma):
    """alpha * sum_t gamma^k (logp - ref) over real tokens, k counting real tokens from 0."""
    out = np.zeros(logps.shape[0])
    for b in range(logps.shape[0]):
        k, total = 0, 0.0
        for t in range(logps.shape[1]):
            if mask[b, t]:
                diff = float(logps[b, t]) - (0.0 if ref is None else float(ref[b, t]))
                total += gamma**k * diff
                k += 1
        out[b] = alpha * total
    return out


def _np_nll(logps, mask):
    n = mask.sum(-1)
    return -np.where(mask, logps, 0.0).sum(-1) / np.maximum(n, 1)


def _np_cpl(lc, lr, mc, mr, *, alpha, lam, gamma=1.0, label=None, rc=None, rr=None,
            bc_coeff=0.0, bc_segments="preferred"):
    lc, lr = np.asarray(lc, np.float64), np.asarray(lr, np.float64)
    mc, mr = np.asarray(mc, bool), np.asarray(mr, bool)
    a_c = _np_advantage(lc, mc, rc, alpha=alpha, gamma=gamma)
    a_r = _np_advantage(lr, mr, rr, alpha=alpha, gamma=gamma)
    p = np.ones(lc.shape[0]) if label is None else np.asarray(label, np.float64)
    cpl = p * _softplus(-(a_c - lam * a_r)) + (1 - p) * _softplus(-(a_r - lam * a_c))
    if bc_segments == "preferred":
        bc = p * _np_nll(lc, mc) + (1 - p) * _np_nll(lr, mr)
    else:
        total = np.where(mc, lc, 0.0).sum(-1) + np.where(mr, lr, 0.0).sum(-1)
        bc = -total / np.maximum(mc.sum(-1) + mr.sum(-1), 1)
    return {"loss": cpl + bc_coeff * bc, "cpl": cpl, "bc": bc, "a_c": a_c, "a_r": a_r}


def _reference_code_loss(lp1, lp2, y, *, alpha, bias, bc_coeff, bc_data):
    """`CPL._get_cpl_loss` + `train_step` of github.com/jhejna/cpl on full (unmasked) segments:
    y = 1 when segment 2 is preferred; the biased BCE with its log-sum-exp trick; the BC loss
    over all tokens (`bc_data="all"`) or the preferred segment's (`"pos"`)."""
    lp1, lp2, y = (np.asarray(x, np.float64) for x in (lp1, lp2, y))
    adv1, adv2 = (alpha * lp1).sum(-1), (alpha * lp2).sum(-1)
    logit21, logit12 = adv2 - bias * adv1, adv1 - bias * adv2
    max21, max12 = np.maximum(-logit21, 0.0), np.maximum(-logit12, 0.0)
    nlp21 = np.log(np.exp(-max21) + np.exp(-logit21 - max21)) + max21
    nlp12 = np.log(np.exp(-max12) + np.exp(-logit12 - max12)) + max12
    cpl = np.mean(y * nlp21 + (1 - y) * nlp12)
    if bc_data == "pos":
        lp_pos = np.concatenate([lp1[y <= 0.5], lp2[y >= 0.5]], axis=0)
        bc = np.mean(-lp_pos)
    else:
        bc = np.mean(-np.concatenate([lp1, lp2], axis=0))
    return cpl + bc_coeff * bc


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _f32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


def _batch(seed, b=6, tc=7, tr=5):
    """Token log-probs, references and ragged right-padded masks (one fully masked segment)."""
    rng = np.random.default_rng(seed)
    lc = -np.abs(rng.normal(1.5, 1.0, (b, tc)))
    lr = -np.abs(rng.normal(2.0, 1.0, (b, tr)))
    rc = lc + rng.normal(0.0, 0.3, (b, tc))
    rr = lr + rng.normal(0.0, 0.3, (b, tr))
    mc = np.arange(tc)[None, :] < rng.integers(1, tc + 1, b)[:, None]
    mr = np.arange(tr)[None, :] < rng.integers(1, tr + 1, b)[:, None]
    mr[-1] = False
    label = rng.uniform(0.0, 1.0, b)
    return lc, lr, mc, mr, rc, rr, label


def _call(lc, lr, mc, mr, **kwargs):
    return L.cpl_loss(*_f32(lc, lr), jnp.asarray(mc), jnp.asarray(mr), **kwargs)


FIELDS = (("loss", "loss"), ("cpl", "cpl"), ("bc", "bc"), ("chosen_advantage", "a_c"),
          ("rejected_advantage", "a_r"))


def _assert_matches(got, want, rtol=2e-5, atol=2e-6):
    for field, key in FIELDS:
        value = getattr(got, field)
        assert value.dtype == jnp.float32, field
        np.testing.assert_allclose(np.asarray(value), want[key], rtol=rtol, atol=atol,
                                   err_msg=field)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


class TestCPL(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        (1.0, False, False, (0.0, "preferred")),
        (0.9, False, False, (0.0, "preferred")),
        (1.0, True, False, (0.7, "preferred")),
        (0.9, True, True, (0.7, "preferred")),
        (0.9, False, True, (0.7, "both")),
        (1.0, True, True, (0.0, "both")),
    )
    def test_matches_float64_reference(self, discount, with_ref, soft_label, bc):
        lc, lr, mc, mr, rc, rr, label = _batch(0)
        bc_coeff, bc_segments = bc
        refs = (rc, rr) if with_ref else (None, None)
        p = label if soft_label else None

        def fn(lc, lr, mc, mr, rc, rr, p):
            return L.cpl_loss(lc, lr, mc, mr, alpha=0.3, conservative_bias=0.6,
                              discount=discount, label=p, ref_chosen_token_logps=rc,
                              ref_rejected_token_logps=rr, bc_coeff=bc_coeff,
                              bc_segments=bc_segments)

        got = self.variant(fn)(*_f32(lc, lr), jnp.asarray(mc), jnp.asarray(mr), *_f32(*refs, p))
        want = _np_cpl(lc, lr, mc, mr, alpha=0.3, lam=0.6, gamma=discount, label=p,
                       rc=refs[0], rr=refs[1], bc_coeff=bc_coeff, bc_segments=bc_segments)
        assert got.loss.shape == (6,)
        _assert_matches(got, want)

    @parameterized.parameters(("all", 1.0, 1.0), ("pos", 0.5, 0.0), ("all", 0.5, 0.3))
    def test_matches_the_reference_code(self, bc_data, bias, bc_coeff):
        # The reference code's segments are full (no padding) and of one length; its label y
        # says segment 2 is preferred: chosen = segment 1 with p = 1 - y.
        rng = np.random.default_rng(1)
        lp1, lp2 = -np.abs(rng.normal(1.0, 0.7, (8, 6))), -np.abs(rng.normal(1.0, 0.7, (8, 6)))
        y = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float64)
        want = _reference_code_loss(lp1, lp2, y, alpha=0.1, bias=bias, bc_coeff=bc_coeff,
                                    bc_data=bc_data)
        ones = np.ones_like(lp1, bool)
        got = _call(lp1, lp2, ones, ones, alpha=0.1, conservative_bias=bias,
                    label=jnp.asarray(1.0 - y), bc_coeff=bc_coeff,
                    bc_segments="both" if bc_data == "all" else "preferred")
        assert float(jnp.mean(got.loss)) == pytest.approx(float(want), rel=2e-6)

    def test_hand_worked(self):
        lc, lr = np.array([[-1.0, -2.0]]), np.array([[-3.0]])
        mc, mr = np.ones((1, 2), bool), np.ones((1, 1), bool)
        # alpha 1, lambda 0.5: A+ = -3, A- = -3, z = -3 + 1.5 = -1.5, loss = log(1 + e^1.5)
        got = _call(lc, lr, mc, mr, alpha=1.0, conservative_bias=0.5)
        assert float(got.loss[0]) == pytest.approx(math.log1p(math.exp(1.5)), abs=1e-6)
        assert float(got.loss[0]) == pytest.approx(1.7014132, abs=1e-6)
        # gamma 0.5: A+ = -1 + 0.5 * -2 = -2, z = -2 + 1.5 = -0.5: log(1 + e^0.5) = 0.9740770
        got = _call(lc, lr, mc, mr, alpha=1.0, conservative_bias=0.5, discount=0.5)
        assert float(got.chosen_advantage[0]) == -2.0
        assert float(got.loss[0]) == pytest.approx(0.9740770, abs=1e-6)
        # lambda 1, alpha 0.5: z = 0.5 * (-3 + 3) = 0: log 2; BC on the chosen segment: 1.5
        got = _call(lc, lr, mc, mr, alpha=0.5, conservative_bias=1.0, bc_coeff=2.0)
        assert float(got.cpl[0]) == pytest.approx(math.log(2.0), abs=1e-6)
        assert float(got.bc[0]) == pytest.approx(1.5)
        assert float(got.loss[0]) == pytest.approx(math.log(2.0) + 3.0, abs=1e-6)
        # BC over both segments: (1 + 2 + 3) / 3 = 2
        got = _call(lc, lr, mc, mr, bc_coeff=1.0, bc_segments="both")
        assert float(got.bc[0]) == pytest.approx(2.0)
        # label 0 (rejected preferred), lambda 0.5, alpha 1: z = A- - 0.5 A+ = -3 + 1.5 = -1.5
        got = _call(lc, lr, mc, mr, alpha=1.0, label=jnp.zeros(1))
        assert float(got.loss[0]) == pytest.approx(1.7014132, abs=1e-6)
        assert float(got.bc[0]) == pytest.approx(3.0)  # preferred segment = the rejected input

    def test_special_cases_are_dpo_and_cpo(self):
        lc, lr, mc, mr, rc, rr, _ = _batch(2)
        seq = lambda x, m: L.sequence_logps(jnp.asarray(x, jnp.float32), jnp.asarray(m))  # noqa: E731
        got = _call(lc, lr, mc, mr, alpha=0.2, conservative_bias=1.0,
                    ref_chosen_token_logps=jnp.asarray(rc, jnp.float32),
                    ref_rejected_token_logps=jnp.asarray(rr, jnp.float32))
        dpo = L.dpo_loss(seq(lc, mc), seq(lr, mr), seq(rc, mc), seq(rr, mr), beta=0.2)
        np.testing.assert_allclose(got.loss, dpo, rtol=1e-5, atol=1e-6)
        got = _call(lc, lr, mc, mr, alpha=0.2, conservative_bias=1.0)
        cpo = L.cpo_loss(seq(lc, mc), seq(lr, mr), beta=0.2)
        np.testing.assert_allclose(got.loss, cpo, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(1.0, 0.8)
    def test_masked_equals_sliced_with_left_and_right_padding(self, discount):
        lc, lr, mc, mr, rc, rr, label = _batch(3)
        kwargs = dict(alpha=0.4, conservative_bias=0.7, discount=discount, bc_coeff=0.5)
        got = _call(lc, lr, mc, mr, label=jnp.asarray(label), **kwargs)
        # the same rows left-padded (real tokens at the end): the discount counts real tokens
        left = lambda x, m: np.stack([np.roll(r, -int(mm.sum())) for r, mm in zip(x, m)])  # noqa: E731
        left_m = lambda m: np.stack([np.roll(mm, -int(mm.sum())) for mm in m])  # noqa: E731
        got_left = _call(left(lc, mc), left(lr, mr), left_m(mc), left_m(mr),
                         label=jnp.asarray(label), **kwargs)
        for b in range(lc.shape[0]):
            nc, nr = int(mc[b].sum()), int(mr[b].sum())
            row = _call(lc[b:b + 1, :nc], lr[b:b + 1, :nr], np.ones((1, nc), bool),
                        np.ones((1, nr), bool), label=jnp.asarray(label[b:b + 1]), **kwargs)
            for field, _ in FIELDS:
                np.testing.assert_allclose(getattr(got, field)[b], getattr(row, field)[0],
                                           rtol=1e-6, atol=1e-6, err_msg=field)
                np.testing.assert_allclose(getattr(got_left, field)[b], getattr(row, field)[0],
                                           rtol=1e-6, atol=1e-6, err_msg=field)

    def test_padding_gets_exactly_zero_gradient_even_when_it_holds_nan(self):
        lc, lr, mc, mr, rc, rr, label = _batch(4)
        lc, lr = np.where(mc, lc, np.nan), np.where(mr, lr, -np.inf)
        rc, rr = np.where(mc, rc, np.inf), np.where(mr, rr, np.nan)

        def total(lc, lr, rc, rr):
            out = L.cpl_loss(lc, lr, jnp.asarray(mc), jnp.asarray(mr), discount=0.9,
                             label=jnp.asarray(label), ref_chosen_token_logps=rc,
                             ref_rejected_token_logps=rr, bc_coeff=0.3, bc_segments="both")
            return jnp.sum(out.loss)

        args = _f32(lc, lr, rc, rr)
        assert np.isfinite(float(total(*args)))
        grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(*args)
        for g, m in zip(grads, (mc, mr, mc, mr)):
            g = np.asarray(g)
            assert np.all(np.isfinite(g))
            np.testing.assert_array_equal(g[~m], 0.0)
            assert np.any(g[m] != 0.0)

    def test_fully_masked_rows_are_finite_with_finite_gradients(self):
        lc, lr, mc, mr, *_ = _batch(5)
        mc[0], mr[0] = False, False
        lc[0], lr[0] = np.nan, np.nan

        def total(lc, lr):
            return jnp.sum(L.cpl_loss(lc, lr, jnp.asarray(mc), jnp.asarray(mr), bc_coeff=1.0,
                                      discount=0.95).loss)

        value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(*_f32(lc, lr))
        assert np.isfinite(float(value))
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
            np.testing.assert_array_equal(np.asarray(g)[0], 0.0)
        # both segments empty: A+ = A- = 0, loss = log 2, BC 0
        out = _call(lc, lr, mc, mr, bc_coeff=1.0)
        assert float(out.loss[0]) == pytest.approx(math.log(2.0), abs=1e-6)

    def test_check_grads(self):
        lc, lr, mc, mr, rc, rr, label = _batch(6, b=3, tc=4, tr=3)
        mc_j, mr_j, p = jnp.asarray(mc), jnp.asarray(mr), jnp.asarray(label, jnp.float32)

        def total(lc, lr, rc, rr):
            return jnp.sum(L.cpl_loss(lc, lr, mc_j, mr_j, alpha=0.5, conservative_bias=0.6,
                                      discount=0.9, label=p, ref_chosen_token_logps=rc,
                                      ref_rejected_token_logps=rr, bc_coeff=0.4).loss)

        check_grads(jax.jit(total), _f32(lc, lr, rc, rr), order=1, modes=["rev"], atol=5e-2,
                    rtol=5e-2)

    def test_gradient_raises_the_chosen_and_lowers_the_rejected(self):
        lc, lr, mc, mr, *_ = _batch(7)
        grads = jax.jit(jax.grad(lambda a, b: jnp.sum(L.cpl_loss(a, b, jnp.asarray(mc), jnp.asarray(mr),
                                                         conservative_bias=1.0).loss),
                         argnums=(0, 1)))(*_f32(lc, lr))
        assert np.all(np.asarray(grads[0])[mc] < 0) and np.all(np.asarray(grads[1])[mr] > 0)

    @parameterized.parameters(1.0, 0.5)
    def test_extreme_inputs(self, bias):
        # log-probs of -1e4 and -1e-4 per token: |A+ - lambda A-| up to ~1e4; float32 still
        # matches float64 and the gradients stay finite.
        lc = np.array([[-1e4, -1e4, -1e4], [-1e-4, -1e-4, -1e-4], [-1e4, -1e-4, -50.0],
                       [0.0, 0.0, 0.0]], np.float32)
        lr = np.array([[-1e-4, -1e-4], [-1e4, -1e4], [-1e4, -1e4], [-1e4, 0.0]], np.float32)
        mc, mr = np.ones_like(lc, bool), np.ones_like(lr, bool)
        label = np.array([1.0, 0.0, 0.3, 1.0])
        kwargs = dict(alpha=1.0, conservative_bias=bias, label=jnp.asarray(label), bc_coeff=0.1)
        got = _call(lc, lr, mc, mr, **kwargs)
        want = _np_cpl(lc, lr, mc, mr, alpha=1.0, lam=bias, label=label, bc_coeff=0.1)
        _assert_matches(got, want, rtol=1e-5, atol=1e-3)
        for jit in (False, True):
            fn = jax.value_and_grad(lambda a, b: jnp.sum(L.cpl_loss(
                a, b, jnp.asarray(mc), jnp.asarray(mr), **kwargs).loss), argnums=(0, 1))
            value, grads = (jax.jit(fn) if jit else fn)(*_f32(lc, lr))
            assert np.isfinite(float(value))
            assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)

    def test_sharded_batch_matches_single_device(self):
        lc, lr, mc, mr, rc, rr, label = _batch(8, b=8)
        args = (*_f32(lc, lr), jnp.asarray(mc), jnp.asarray(mr))
        fn = jax.jit(lambda a, b, c, d: L.cpl_loss(a, b, c, d, discount=0.9, bc_coeff=0.2).loss)
        want = fn(*args)
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        sharded = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in args]
        got = fn(*sharded)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

    def test_dtype_and_different_segment_lengths(self):
        lc, lr, mc, mr, *_ = _batch(9, tc=9, tr=3)
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            got = L.cpl_loss(jnp.asarray(lc, dtype), jnp.asarray(lr, dtype), jnp.asarray(mc),
                             jnp.asarray(mr, jnp.float32))
            assert got.loss.shape == (6,) and got.loss.dtype == jnp.float32

    def test_argument_errors_name_the_argument(self):
        z2, m2 = jnp.zeros((2, 3)), jnp.ones((2, 3))
        for kwargs, match in [
            (dict(alpha=0.0), "alpha must be > 0.0"),
            (dict(alpha=-1.0), "alpha must be"),
            (dict(conservative_bias=0.0), r"conservative_bias must be in \(0.0, 1.0\]"),
            (dict(conservative_bias=1.5), "conservative_bias must be"),
            (dict(discount=0.0), r"discount must be in \(0.0, 1.0\]"),
            (dict(discount=1.01), "discount must be"),
            (dict(discount=float("nan")), "discount must be"),
            (dict(bc_coeff=-0.1), "bc_coeff must be >= 0.0"),
            (dict(bc_segments="all"), "bc_segments='all' is not supported.*'preferred', 'both'"),
            (dict(ref_chosen_token_logps=z2), "both ref_chosen_token_logps and ref_rejected"),
            (dict(label=jnp.ones(3)), "label must have shape \\(2,\\)"),
        ]:
            with pytest.raises(ValueError, match=match):
                L.cpl_loss(z2, z2, m2, m2, **kwargs)
        with pytest.raises(AssertionError, match="chosen_mask=\\(2, 4\\)"):
            L.cpl_loss(z2, z2, jnp.ones((2, 4)), m2)
        with pytest.raises(AssertionError, match="ref_rejected_token_logps=\\(2, 2\\)"):
            L.cpl_loss(z2, z2, m2, m2, ref_chosen_token_logps=z2,
                       ref_rejected_token_logps=jnp.zeros((2, 2)))
        with pytest.raises(AssertionError, match="`chosen_token_logps` must have rank 2"):
            L.cpl_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), jnp.ones(2))
        with pytest.raises(ValueError, match="same batch size"):
            L.cpl_loss(z2, jnp.zeros((3, 3)), m2, jnp.ones((3, 3)))

    def test_traced_hyper_parameters_are_accepted(self):
        lc, lr, mc, mr, *_ = _batch(10)
        fn = jax.jit(lambda a, lam, g: L.cpl_loss(*_f32(lc, lr), jnp.asarray(mc), jnp.asarray(mr),
                                                  alpha=a, conservative_bias=lam,
                                                  discount=g).loss)
        want = _np_cpl(lc, lr, mc, mr, alpha=0.3, lam=0.6, gamma=0.9)["loss"]
        np.testing.assert_allclose(fn(0.3, 0.6, 0.9), want, rtol=2e-5, atol=2e-6)
