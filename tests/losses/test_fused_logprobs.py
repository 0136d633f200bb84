"""fused_token_logps against float64 NumPy (values and gradients), the unfused losses, a sharded
vocabulary on 8 devices, and compiled memory that grows with chunk * V, not T * V."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jax.test_util import check_grads

from rlhf_jax.losses import (
    FusedLogps,
    entropy_from_logits,
    fused_token_logps,
    masked_sum,
    token_logps,
)

VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])


# ----------------------------------------------------------------- float64 NumPy reference
def np_logits(h, w, layout, bias=None, temperature=1.0):
    h = np.asarray(h, np.float64)
    w = np.asarray(w, np.float64)
    z = h @ (w if layout == "ev" else w.T)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    return z / temperature


def np_outputs(z, y):
    """(logps, entropy, argmax, log-softmax) of logits z [..., V] and targets y [...]."""
    mx = z.max(-1, keepdims=True)
    lsm = z - mx - np.log(np.exp(z - mx).sum(-1, keepdims=True))
    p = np.exp(lsm)
    logps = np.take_along_axis(lsm, np.asarray(y)[..., None], -1)[..., 0]
    entropy = -np.where(p > 0, p * np.where(p > 0, lsm, 0.0), 0.0).sum(-1)
    return logps, entropy, z.argmax(-1), lsm


def np_grads(h, w, y, g_logps, g_entropy, layout, bias=None, temperature=1.0):
    """Gradients of sum(g_logps * logps + g_entropy * entropy) w.r.t. (h, w, bias), by hand:
    dz = g_l (onehot(y) - p) - g_H p (log p + H), then the chain rule through z = (hW + c)/tau."""
    z = np_logits(h, w, layout, bias, temperature)
    _, entropy, _, lsm = np_outputs(z, y)
    p = np.exp(lsm)
    onehot = np.eye(z.shape[-1])[np.asarray(y)]
    gl = np.asarray(g_logps, np.float64)[..., None]
    ge = np.asarray(g_entropy, np.float64)[..., None]
    dz = gl * (onehot - p) - ge * p * (lsm + entropy[..., None])
    dz = dz / temperature
    w64 = np.asarray(w, np.float64)
    w_ev = w64 if layout == "ev" else w64.T
    dh = dz @ w_ev.T
    dw_ev = np.einsum("bte,btv->ev", np.asarray(h, np.float64), dz)
    dw = dw_ev if layout == "ev" else dw_ev.T
    return dh, dw, dz.sum((0, 1))


def _data(seed, b=2, t=7, e=5, v=11, layout="ev", scale=1.0):
    rng = np.random.default_rng(seed)
    h = (scale * rng.standard_normal((b, t, e))).astype(np.float32)
    w = rng.standard_normal((e, v) if layout == "ev" else (v, e)).astype(np.float32)
    bias = rng.standard_normal(v).astype(np.float32)
    y = rng.integers(0, v, size=(b, t)).astype(np.int32)
    return h, w, bias, y


class TestValues:
    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("chunk_size", [1, 3, 64])
    def test_matches_numpy(self, variant, layout, chunk_size):
        h, w, bias, y = _data(0, layout=layout)
        fn = variant(functools.partial(fused_token_logps, layout=layout, bias=bias,
                                       temperature=0.7, chunk_size=chunk_size,
                                       with_entropy=True, with_argmax=True))
        out = fn(h, w, y)
        assert isinstance(out, FusedLogps)
        assert out.logps.shape == out.entropy.shape == out.argmax.shape == (2, 7)
        assert out.logps.dtype == out.entropy.dtype == jnp.float32
        assert out.argmax.dtype == jnp.int32
        logps, entropy, argmax, _ = np_outputs(np_logits(h, w, layout, bias, 0.7), y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, entropy, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.argmax, argmax)

    @pytest.mark.parametrize("keep_logits", [False, True])
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    def test_log_probs_of_dominant_targets_never_exceed_zero(self, layout, keep_logits):
        """Large logits with the argmax as target: the log-probs are <= 0 (never a rounding
        error above it) and within float32 rounding of the float64 reference."""
        h, w, bias, _ = _data(7, b=4, t=16, e=16, v=300, layout=layout, scale=8.0)
        logits = np_logits(h, w, layout, bias, 1.0)
        y = np.argmax(logits, axis=-1).astype(np.int32)
        out = fused_token_logps(h, w, y, layout=layout, bias=bias, chunk_size=5,
                                keep_logits=keep_logits)
        assert float(jnp.max(out.logps)) <= 0.0
        logps, *_ = np_outputs(logits, y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-5, atol=1e-4)

    def test_optional_outputs_are_none(self):
        h, w, _, y = _data(1)
        out = fused_token_logps(h, w, y)
        assert out.entropy is None and out.argmax is None

    def test_hand_worked(self):
        # E = 1, h = 1, W = [0, log 3] -> p = [1/4, 3/4]; targets 1 then 0.
        h = jnp.ones((1, 2, 1))
        w = jnp.array([[0.0, np.log(3.0)]])
        out = fused_token_logps(h, w, jnp.array([[1, 0]]), chunk_size=1, with_entropy=True,
                                with_argmax=True)
        ent = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
        np.testing.assert_allclose(out.logps, [[np.log(0.75), np.log(0.25)]], rtol=1e-6)
        np.testing.assert_allclose(out.entropy, [[ent, ent]], rtol=1e-6)
        np.testing.assert_array_equal(out.argmax, [[1, 1]])
        # Temperature 2 halves the logits: p = [1, sqrt 3] / (1 + sqrt 3).
        out = fused_token_logps(h, w, jnp.array([[1, 0]]), temperature=2.0)
        s3 = np.sqrt(3.0)
        np.testing.assert_allclose(out.logps, [[np.log(s3 / (1 + s3)), np.log(1 / (1 + s3))]],
                                   rtol=1e-6)

    def test_equals_unfused_losses(self):
        h, w, bias, y = _data(2, t=9)
        z = jnp.asarray(h) @ w + bias
        out = fused_token_logps(h, w, y, bias=bias, chunk_size=4, with_entropy=True)
        np.testing.assert_allclose(out.logps, token_logps(z, y), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.entropy, entropy_from_logits(z), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("t,chunk_size", [(10, 4), (9, 4), (1, 8), (16, 5)])
    def test_chunks_balanced_and_padding_dropped(self, t, chunk_size):
        h, w, _, y = _data(3, t=t)
        out = fused_token_logps(h, w, y, chunk_size=chunk_size)
        np.testing.assert_allclose(out.logps, np_outputs(np_logits(h, w, "ev"), y)[0],
                                   rtol=1e-5, atol=1e-5)

    def test_bf16_inputs_compute_in_float32(self):
        h, w, _, y = _data(4)
        hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
        out = fused_token_logps(hb, wb, y, chunk_size=3, with_entropy=True)
        assert out.logps.dtype == out.entropy.dtype == jnp.float32
        z = np_logits(np.asarray(hb, np.float32), np.asarray(wb, np.float32), "ev")
        np.testing.assert_allclose(out.logps, np_outputs(z, y)[0], rtol=2e-2, atol=2e-2)
        gh, gw = jax.grad(lambda a, b: fused_token_logps(a, b, y).logps.sum(), (0, 1))(hb, wb)
        assert gh.dtype == gw.dtype == jnp.bfloat16

    def test_out_of_range_targets_are_nan(self):
        h, w, _, y = _data(5)
        y = y.copy()
        y[0, 0], y[1, 1] = -1, 11
        out = fused_token_logps(h, w, y)
        assert np.isnan(out.logps[0, 0]) and np.isnan(out.logps[1, 1])
        assert np.isfinite(np.delete(np.asarray(out.logps).ravel(), [0, 8])).all()
        # Masked out, they get no gradient and leave the others finite.
        mask = np.ones((2, 7), np.float32)
        mask[0, 0] = mask[1, 1] = 0
        gh = jax.grad(lambda a: masked_sum(fused_token_logps(a, w, y).logps, mask))(h)
        assert np.isfinite(gh).all()
        np.testing.assert_array_equal(gh[0, 0], 0.0)


class TestGradients:
    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("with_bias", [False, True])
    @pytest.mark.parametrize("keep_logits", [False, True])
    def test_matches_numpy(self, variant, layout, with_bias, keep_logits):
        h, w, bias, y = _data(10, layout=layout)
        bias = bias if with_bias else None
        rng = np.random.default_rng(11)
        g_l = rng.standard_normal((2, 7)).astype(np.float32)
        g_e = rng.standard_normal((2, 7)).astype(np.float32)

        def loss(h, w, bias):
            out = fused_token_logps(h, w, y, layout=layout, bias=bias, temperature=1.3,
                                    chunk_size=3, with_entropy=True, keep_logits=keep_logits)
            return jnp.sum(g_l * out.logps) + jnp.sum(g_e * out.entropy)

        grads = variant(jax.grad(loss, argnums=(0, 1, 2)))(h, w, bias)
        dh, dw, db = np_grads(h, w, y, g_l, g_e, layout, bias, 1.3)
        np.testing.assert_allclose(grads[0], dh, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads[1], dw, rtol=1e-4, atol=1e-5)
        if with_bias:
            np.testing.assert_allclose(grads[2], db, rtol=1e-4, atol=1e-5)
        else:
            assert grads[2] is None

    def test_logps_only_matches_autodiff_of_unfused(self):
        h, w, _, y = _data(12, t=10)
        g = np.random.default_rng(13).standard_normal((2, 10)).astype(np.float32)
        fused = jax.grad(lambda a, b: jnp.sum(g * fused_token_logps(a, b, y, chunk_size=4)
                                              .logps), (0, 1))(h, w)
        plain = jax.grad(lambda a, b: jnp.sum(g * token_logps(a @ b, y)), (0, 1))(h, w)
        for a, b in zip(fused, plain):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("layout", ["ev", "ve"])
    def test_check_grads(self, layout):
        h, w, bias, y = _data(14, b=1, t=3, e=3, v=4, layout=layout)

        def f(h, w, bias):
            out = fused_token_logps(h, w, y, layout=layout, bias=bias, temperature=0.8,
                                    chunk_size=2, with_entropy=True)
            return out.logps + 0.5 * out.entropy

        check_grads(f, (jnp.asarray(h), jnp.asarray(w), jnp.asarray(bias)), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_masked_positions_get_zero_gradient(self):
        h, w, _, y = _data(15, t=8)
        mask = np.ones((2, 8), np.float32)
        mask[0, 5:] = 0
        mask[1] = 0  # a fully masked row

        def loss(h):
            out = fused_token_logps(h, w, y, chunk_size=3, with_entropy=True)
            return masked_sum(out.logps, mask) + masked_sum(out.entropy, mask)

        gh = jax.grad(loss)(h)
        assert np.isfinite(gh).all()
        np.testing.assert_array_equal(gh[0, 5:], 0.0)
        np.testing.assert_array_equal(gh[1], 0.0)
        # The masked loss equals the loss on the sliced real tokens.
        sliced = fused_token_logps(h[:1, :5], w, y[:1, :5], with_entropy=True)
        np.testing.assert_allclose(loss(h), sliced.logps.sum() + sliced.entropy.sum(),
                                   rtol=1e-5)

    @pytest.mark.parametrize("big", [1e4, -1e4])
    def test_extreme_logits(self, big):
        h, w, _, y = _data(16, e=2)
        h = h.copy()
        h[..., 0] = big  # logits of order 1e4 in both directions
        out = fused_token_logps(h, w, y, chunk_size=3, with_entropy=True)
        gh, gw = jax.grad(
            lambda a, b: jnp.sum(fused_token_logps(a, b, y, chunk_size=3,
                                                   with_entropy=True).entropy
                                 + fused_token_logps(a, b, y, chunk_size=3).logps),
            (0, 1))(h, w)
        assert np.isfinite(out.logps).all() and np.isfinite(out.entropy).all()
        assert np.isfinite(gh).all() and np.isfinite(gw).all()
        logps, entropy, _, _ = np_outputs(np_logits(h, w, "ev"), y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-5, atol=2e-2)
        np.testing.assert_allclose(out.entropy, entropy, atol=1e-2)

    def test_minus_inf_bias_masks_tokens(self):
        h, w, bias, y = _data(17)
        bias = bias.copy()
        bias[3:6] = -np.inf  # banned tokens: probability exactly 0
        y = np.where((y >= 3) & (y < 6), 0, y).astype(np.int32)

        def loss(h, w):
            out = fused_token_logps(h, w, y, bias=bias, chunk_size=4, with_entropy=True)
            return jnp.sum(out.logps) + jnp.sum(out.entropy)

        out = fused_token_logps(h, w, y, bias=bias, with_entropy=True)
        logps, entropy, _, _ = np_outputs(np_logits(h, w, "ev", bias), y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, entropy, rtol=1e-5, atol=1e-5)
        gh, gw = jax.grad(loss, (0, 1))(h, w)
        assert np.isfinite(gh).all() and np.isfinite(gw).all()
        np.testing.assert_array_equal(gw[:, 3:6], 0.0)


class TestArguments:
    def test_bad_layout(self):
        h, w, _, y = _data(20)
        with pytest.raises(ValueError, match="layout"):
            fused_token_logps(h, w, y, layout="vocab")

    def test_width_mismatch_names_layout(self):
        h, w, _, y = _data(21)
        with pytest.raises(ValueError, match="layout='ve'"):
            fused_token_logps(h, w, y, layout="ve")

    @pytest.mark.parametrize("bad", [0, -2, 1.5, True])
    def test_bad_chunk_size(self, bad):
        h, w, _, y = _data(22)
        with pytest.raises(ValueError, match="chunk_size"):
            fused_token_logps(h, w, y, chunk_size=bad)

    @pytest.mark.parametrize("bad", [0.0, -1.0, jnp.float32(1.0)])
    def test_bad_temperature(self, bad):
        h, w, _, y = _data(23)
        with pytest.raises(ValueError, match="temperature"):
            fused_token_logps(h, w, y, temperature=bad)

    def test_shapes(self):
        h, w, bias, y = _data(24)
        with pytest.raises(ValueError, match="targets.shape"):
            fused_token_logps(h, w, y[:, :3])
        with pytest.raises(ValueError, match="bias.shape"):
            fused_token_logps(h, w, y, bias=bias[:4])
        with pytest.raises(AssertionError, match="hidden"):
            fused_token_logps(h[0], w, y)
        with pytest.raises(TypeError, match="integer"):
            fused_token_logps(h, w, y.astype(np.float32))


# ----------------------------------------------------------------- scoring some tokens only
def _where(seed, b, t, p=0.4):
    where = np.random.default_rng(seed).random((b, t)) < p
    where[0, :2] = [True, False]
    where[-1] = False  # a row with nothing to score
    return where


def _assert_grads_match_numpy(variant, h, w, bias, y, where, *, seed, layout, **head_kwargs):
    """The gradients (h, W, bias) of ``sum(g_l * logps + g_e * entropy)`` through
    `fused_token_logps` (temperature 1.3, chunks of 3, ``where``, ``head_kwargs``) against
    float64 NumPy, whose cotangents are zero on the unscored tokens. Returns the gradients."""
    rng = np.random.default_rng(seed)
    g_l = rng.standard_normal(y.shape).astype(np.float32)
    g_e = rng.standard_normal(y.shape).astype(np.float32)

    def loss(h, w, bias):
        out = fused_token_logps(h, w, y, layout=layout, bias=bias, temperature=1.3,
                                chunk_size=3, with_entropy=True, where=where, **head_kwargs)
        return jnp.sum(g_l * out.logps) + jnp.sum(g_e * out.entropy)

    grads = variant(jax.grad(loss, argnums=(0, 1, 2)))(h, w, bias)
    m = 1.0 if where is None else where
    dh, dw, db = np_grads(h, w, y, g_l * m, g_e * m, layout, bias, 1.3)
    np.testing.assert_allclose(grads[0], dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], dw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[2], db, rtol=1e-4, atol=1e-5)
    return grads


class TestWhere:
    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("keep_logits", [False, True])
    @pytest.mark.parametrize("chunk_size", [1, 3, 64])
    def test_values_match_numpy(self, variant, layout, keep_logits, chunk_size):
        h, w, bias, y = _data(40, b=3, t=11, layout=layout)
        where = _where(41, 3, 11)
        y = y.copy()
        y[0, 1] = -3  # out of range, but not scored: 0, not NaN
        fn = variant(functools.partial(fused_token_logps, layout=layout, bias=bias,
                                       temperature=0.7, chunk_size=chunk_size,
                                       with_entropy=True, with_argmax=True,
                                       keep_logits=keep_logits))
        out = fn(h, w, y, where=where)
        logps, entropy, argmax, _ = np_outputs(np_logits(h, w, layout, bias, 0.7),
                                               np.clip(y, 0, None))
        np.testing.assert_allclose(out.logps, np.where(where, logps, 0.0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, np.where(where, entropy, 0.0), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(out.argmax, np.where(where, argmax, -1))

    def test_hand_worked(self):
        # p = [1/4, 3/4] at every position; only tokens 1 and 2 of the row are scored.
        h = jnp.ones((1, 4, 1))
        w = jnp.array([[0.0, np.log(3.0)]])
        out = fused_token_logps(h, w, jnp.array([[1, 0, 1, 0]]), chunk_size=1,
                                with_argmax=True, where=jnp.array([[False, True, True, False]]))
        np.testing.assert_allclose(out.logps, [[0.0, np.log(0.25), np.log(0.75), 0.0]],
                                   rtol=1e-6)
        np.testing.assert_array_equal(out.argmax, [[-1, 1, 1, -1]])

    def test_scored_out_of_range_target_is_nan(self):
        h, w, _, y = _data(42)
        y = y.copy()
        y[0, 3] = 11
        where = np.zeros((2, 7), bool)
        where[0, 3] = where[1, 4] = True
        out = fused_token_logps(h, w, y, where=where)
        assert np.isnan(out.logps[0, 3]) and np.isfinite(out.logps[1, 4])

    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("keep_logits", [False, True])
    def test_gradients_match_numpy(self, variant, layout, keep_logits):
        h, w, bias, y = _data(43, b=3, t=10, layout=layout)
        where = _where(44, 3, 10)
        grads = _assert_grads_match_numpy(variant, h, w, bias, y, where, seed=45, layout=layout,
                                          keep_logits=keep_logits)
        np.testing.assert_array_equal(np.asarray(grads[0])[~where], 0.0)

    def test_check_grads(self):
        h, w, bias, y = _data(46, b=2, t=4, e=3, v=4)
        where = np.array([[True, False, True, True], [False, False, True, False]])

        def f(h, w, bias):
            out = fused_token_logps(h, w, y, bias=bias, chunk_size=2, with_entropy=True,
                                    where=where)
            return out.logps + 0.5 * out.entropy

        check_grads(f, (jnp.asarray(h), jnp.asarray(w), jnp.asarray(bias)), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    @pytest.mark.parametrize("keep_logits", [False, True])
    def test_nothing_scored(self, keep_logits):
        h, w, _, y = _data(47)
        where = np.zeros((2, 7), bool)
        out, grads = jax.value_and_grad(
            lambda a, b: fused_token_logps(a, b, y, chunk_size=3, keep_logits=keep_logits,
                                           where=where).logps.sum(), (0, 1))(h, w)
        assert float(out) == 0.0
        for g in grads:
            np.testing.assert_array_equal(g, 0.0)

    def test_chunks_without_scored_tokens_are_skipped(self):
        """Every row scores 4 scattered tokens; the others hold NaN hidden states. With chunks
        of 2 positions the scored tokens fill the first 2 chunks of each (compacted) row, so
        the NaN tokens are all in chunks the head never runs: values and gradients are finite
        and equal the clean run's. A chunk that ran would carry NaN into ``dW``."""
        h, w, _, y = _data(48, b=2, t=12)
        where = np.zeros((2, 12), bool)
        where[0, [1, 4, 5, 11]] = True
        where[1, [0, 2, 7, 8]] = True
        dirty = np.where(where[..., None], h, np.nan).astype(np.float32)

        def run(hidden):
            return jax.jit(jax.value_and_grad(
                lambda a, b: fused_token_logps(a, b, y, chunk_size=2, with_entropy=True,
                                               where=where).logps.sum(), (0, 1)))(hidden, w)

        (clean, (gh, gw)), (value, (gh_d, gw_d)) = run(h), run(dirty)
        assert np.isfinite(value) and np.isfinite(gw_d).all()
        np.testing.assert_allclose(value, clean, rtol=1e-6)
        np.testing.assert_allclose(gw_d, gw, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gh_d)[where], np.asarray(gh)[where], rtol=1e-6)

    def test_bad_where(self):
        h, w, _, y = _data(49)
        with pytest.raises(ValueError, match="where.shape"):
            fused_token_logps(h, w, y, where=np.ones((2, 6), bool))


# ----------------------------------------------------------------- strided vocabulary blocks
class TestVocabBlocks:
    """The backward pass over ``vocab_blocks`` strided vocabulary blocks gives the gradients of
    the single pass (and of float64 NumPy), whatever the block count that divides V."""

    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("vocab_blocks", [1, 3, 4, 12])
    @pytest.mark.parametrize("scored", ["all", "where"])
    def test_gradients_match_numpy(self, variant, layout, vocab_blocks, scored):
        h, w, bias, y = _data(60, b=3, t=10, v=12, layout=layout)
        where = _where(61, 3, 10) if scored == "where" else None
        _assert_grads_match_numpy(variant, h, w, bias, y, where, seed=62, layout=layout,
                                  vocab_blocks=vocab_blocks)

    @VARIANTS
    @pytest.mark.parametrize("layout", ["ev", "ve"])
    @pytest.mark.parametrize("vocab_blocks", [3, 12])
    @pytest.mark.parametrize("scored", ["all", "where"])
    def test_values_match_numpy(self, variant, layout, vocab_blocks, scored):
        h, w, bias, y = _data(66, b=3, t=11, v=12, layout=layout)
        where = _where(67, 3, 11) if scored == "where" else np.ones((3, 11), bool)
        fn = variant(functools.partial(fused_token_logps, layout=layout, bias=bias,
                                       temperature=0.7, chunk_size=4, with_entropy=True,
                                       with_argmax=True, vocab_blocks=vocab_blocks))
        out = fn(h, w, y, where=None if scored == "all" else where)
        logps, entropy, argmax, _ = np_outputs(np_logits(h, w, layout, bias, 0.7), y)
        np.testing.assert_allclose(out.logps, np.where(where, logps, 0.0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, np.where(where, entropy, 0.0), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(out.argmax, np.where(where, argmax, -1))

    def test_argmax_ties_take_the_first_id(self):
        # Logits [1, 3, 0, 3, 3, 1] at every position: ids 1, 3 and 4 tie, in 3 blocks
        # ({0, 3}, {1, 4}, {2, 5}) of which the one seen first holds id 3, not id 1.
        w = jnp.array([[1.0, 3.0, 0.0, 3.0, 3.0, 1.0]])
        h, y = jnp.ones((2, 5, 1)), jnp.zeros((2, 5), jnp.int32)
        for nb in (1, 2, 3, 6):
            out = fused_token_logps(h, w, y, chunk_size=2, with_argmax=True, vocab_blocks=nb)
            np.testing.assert_array_equal(out.argmax, 1)

    @pytest.mark.parametrize("big", [1e4, -1e4])
    def test_extreme_logits(self, big):
        h, w, _, y = _data(68, e=2, v=12)
        h = h.copy()
        h[..., 0] = big  # logits of order 1e4 in both directions
        out = fused_token_logps(h, w, y, chunk_size=3, with_entropy=True, vocab_blocks=4)
        logps, entropy, _, _ = np_outputs(np_logits(h, w, "ev"), y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(out.entropy, entropy, rtol=1e-4, atol=1e-3)
        gh, gw = jax.grad(lambda a, b: jnp.sum(fused_token_logps(
            a, b, y, chunk_size=3, with_entropy=True, vocab_blocks=4).entropy), (0, 1))(h, w)
        assert np.isfinite(gh).all() and np.isfinite(gw).all()

    def test_minus_inf_bias_masks_tokens(self):
        h, w, bias, y = _data(69, v=12)
        bias = bias.copy()
        banned = [0, 4, 8, 5]  # all of block 0 (ids 0, 4, 8), the first one seen, and id 5
        bias[banned] = -np.inf
        y = np.where(np.isin(y, banned), 1, y).astype(np.int32)

        def run(h, w):
            return fused_token_logps(h, w, y, bias=bias, chunk_size=3, with_entropy=True,
                                     with_argmax=True, vocab_blocks=4)

        out = run(h, w)
        logps, entropy, argmax, _ = np_outputs(np_logits(h, w, "ev", bias), y)
        np.testing.assert_allclose(out.logps, logps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.entropy, entropy, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.argmax, argmax)
        gw = jax.grad(lambda w: jnp.sum(run(h, w).logps) + jnp.sum(run(h, w).entropy))(w)
        assert np.isfinite(gw).all()
        np.testing.assert_array_equal(gw[:, banned], 0.0)

    def test_logps_only_without_bias(self):
        h, w, _, y = _data(63, t=10, v=12)
        g = np.random.default_rng(64).standard_normal((2, 10)).astype(np.float32)
        grads = {nb: jax.grad(lambda a, b, nb=nb: jnp.sum(
            g * fused_token_logps(a, b, y, chunk_size=4, vocab_blocks=nb).logps), (0, 1))(h, w)
            for nb in (1, 6)}
        for a, b in zip(grads[6], grads[1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("bad", [0, -2, 5, 2.0, True])
    def test_bad_vocab_blocks(self, bad):
        h, w, _, y = _data(65, v=12)
        with pytest.raises(ValueError, match="vocab_blocks"):
            fused_token_logps(h, w, y, vocab_blocks=bad)


# ----------------------------------------------------------------- 8 devices, vocab over tensor
def _mesh(data, tensor):
    devices = np.asarray(jax.devices()[: data * tensor]).reshape(data, 1, tensor)
    return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("layout", ["ev", "ve"])
@pytest.mark.parametrize(("keep_logits", "vocab_blocks"), [(False, 1), (False, 4), (True, None)])
@pytest.mark.parametrize("scored", ["all", "where"])
def test_vocab_sharded_over_tensor_equals_unsharded(layout, keep_logits, vocab_blocks, scored):
    h, w, bias, y = _data(30, b=4, t=12, e=8, v=64, layout=layout)
    g = np.random.default_rng(31).standard_normal((4, 12)).astype(np.float32)
    where = _where(32, 4, 12) if scored == "where" else None

    def f(h, w, bias, y, where):
        out = fused_token_logps(h, w, y, layout=layout, bias=bias, chunk_size=5,
                                with_entropy=True, with_argmax=True, keep_logits=keep_logits,
                                where=where, vocab_blocks=vocab_blocks)
        loss = jnp.sum(g * out.logps) + jnp.sum(out.entropy)
        return loss, out

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (loss, out), grads = step(h, w, bias, y, where)
    mesh = _mesh(2, 4)
    vocab_axis = PartitionSpec(None, "tensor") if layout == "ev" else PartitionSpec("tensor")
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    hs, ws = put(h, PartitionSpec("data")), put(w, vocab_axis)
    bs, ys = put(bias, PartitionSpec("tensor")), put(y, PartitionSpec("data"))
    wheres = None if where is None else put(where, PartitionSpec("data"))
    hlo = step.lower(hs, ws, bs, ys, wheres).compile().as_text()
    # Nothing is gathered but the argmax's per-shard candidates ([B / 2, chunk, 4 shards]):
    # neither the vocabulary-sharded weight nor the data-sharded hidden states (the `where`
    # permutation runs inside each row), nor a strided vocabulary block (4 blocks of 16 ids,
    # each split over the 4 shards).
    gathered = [math.prod(int(d) for d in dims.split(",")) for dims in
                re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo)]
    assert max(gathered, default=0) <= 2 * 4 * 4, gathered
    (loss_s, out_s), grads_s = step(hs, ws, bs, ys, wheres)
    assert grads_s[1].sharding.spec == vocab_axis  # the weight's gradient stays sharded
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    np.testing.assert_allclose(out_s.logps, out.logps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_s.entropy, out.entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_s.argmax, out.argmax)
    for a, b in zip(grads_s, grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("v", [16 * 522, 8 * 1024])
def test_default_vocab_blocks_keep_a_sharded_vocabulary_sharded(v):
    """The default block count leaves blocks that 8 shards divide: a tied table of 16 * 522
    ids (whose 16 blocks of 522 ids 8 shards would not divide) and one of 8,192, sharded over
    8 devices, are never gathered, and the gradient equals the unsharded one."""
    h, _, _, y = _data(33, b=2, t=6, e=4, v=v)
    w = np.random.default_rng(34).standard_normal((v, 4)).astype(np.float32)
    step = jax.jit(jax.grad(lambda h, w: jnp.sum(fused_token_logps(
        h, w, y, layout="ve", chunk_size=3).logps), argnums=(0, 1)))
    mesh = _mesh(1, 8)
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec("tensor")))
    hlo = step.lower(h, ws).compile().as_text()
    gathered = [math.prod(int(d) for d in dims.split(",")) for dims in
                re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", hlo)]
    assert max(gathered, default=0) < v, gathered
    for a, b in zip(step(h, ws), step(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- compiled memory
def _temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def test_memory_grows_with_chunk_times_vocab_not_tokens_times_vocab():
    b, e, v, chunk = 2, 32, 4096, 32

    def grads(fused, t):
        h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
        w = jax.ShapeDtypeStruct((e, v), jnp.float32)
        y = jax.ShapeDtypeStruct((b, t), jnp.int32)

        def loss(h, w, y):
            if fused:
                out = fused_token_logps(h, w, y, chunk_size=chunk, with_entropy=True)
            else:
                z = h @ w
                out = FusedLogps(token_logps(z, y), entropy_from_logits(z))
            return jnp.sum(out.logps) + jnp.sum(out.entropy)

        return _temp_bytes(jax.grad(loss, argnums=(0, 1)), h, w, y)

    block = b * chunk * v * 4  # one float32 [B, chunk, V] block
    weight = e * v * 4  # the float32 [E, V] gradient accumulator
    hidden = b * 1024 * e * 4  # one float32 [B, T, E] array at T = 1024
    full = {t: b * t * v * 4 for t in (256, 1024)}
    fused = {t: grads(True, t) for t in (256, 1024)}
    unfused = {t: grads(False, t) for t in (256, 1024)}
    # The unfused step holds at least one [B, T, V] array; the fused one a few [B, chunk, V]
    # blocks plus the [E, V] accumulator, whatever T is.
    assert unfused[1024] >= full[1024]
    assert fused[1024] < 4 * block + 2 * weight + 4 * hidden
    assert fused[1024] < full[1024] / 4
    # 4x more tokens: the unfused temp grows by ~3 [B, 256, V] arrays, the fused one only by
    # the per-token [B, T, E] arrays (hidden chunks and their gradient), far less.
    assert unfused[1024] - unfused[256] >= full[1024] - full[256]
    assert fused[1024] - fused[256] < (full[1024] - full[256]) / 8


def test_keep_logits_holds_the_logits_and_skips_the_recomputed_product():
    """`keep_logits`: one head product ([B, c, E] x [E, V]) less in the backward pass, and the
    float32 logits held between the passes instead."""
    b, t, e, v = 2, 64, 32, 4096
    h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def grad_fn(keep):  # one vocabulary block, so that every head product spans V
        return jax.grad(lambda h, w, y: fused_token_logps(h, w, y, chunk_size=t, vocab_blocks=1,
                                                          keep_logits=keep).logps.sum(),
                        argnums=(0, 1))

    def products(keep):  # dot_generals whose output has the vocabulary axis, or contracts it
        jaxpr = str(jax.make_jaxpr(grad_fn(keep))(h, w, y))
        return sum(f"{v}" in line and "dot_general" in line for line in jaxpr.splitlines())

    assert products(False) - products(True) == 1
    assert _temp_bytes(grad_fn(True), h, w, y) >= b * t * v * 4


# ----------------------------------------------------------------- the tied head's gradient
def test_tied_head_gradient_is_never_transposed():
    """A [V, E] head's gradient is accumulated as [V, E]: the compiled backward holds no
    column-major [V, E] array (the trace of an [E, V] accumulator transposed at the end), and no
    more temporary memory than one [V, E] float32 array plus a few [B, chunk, V] blocks."""
    b, t, e, v, chunk = 1, 64, 256, 32768, 16
    h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((v, e), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(h, w, y):
        return jnp.sum(fused_token_logps(h, w, y, layout="ve", chunk_size=chunk).logps)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, y).compile()
    assert f"f32[{v},{e}]{{0,1}}" not in compiled.as_text()
    weight, block = v * e * 4, b * chunk * v * 4
    assert compiled.memory_analysis().temp_size_in_bytes < weight + 4 * block


@pytest.mark.parametrize("layout", ["ev", "ve"])
def test_head_gradient_is_the_only_vocabulary_sized_buffer(layout):
    """The backward pass in strided vocabulary blocks (the default here: 16 blocks of 2,048 ids)
    holds the head's float32 gradient (the step's output) and a few blocks, not a second
    ``[V, E]`` array: the single pass (``vocab_blocks=1``) holds each chunk's ``[V, E]`` product
    ``h^T dz`` beside the accumulator, and the accumulator itself as a temporary."""
    b, t, e, v, chunk = 1, 64, 256, 32768, 16
    h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v) if layout == "ev" else (v, e), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp(vocab_blocks):
        def loss(h, w, y):
            return jnp.sum(fused_token_logps(h, w, y, layout=layout, chunk_size=chunk,
                                             vocab_blocks=vocab_blocks).logps)

        return _temp_bytes(jax.grad(loss, argnums=(0, 1)), h, w, y)

    weight, block = v * e * 4, b * chunk * v * 4
    # Two [V / 16, E] blocks of dW (the block's accumulator and one chunk's product, 2 MiB
    # each) and the [B, chunk, V] logits of the forward pass (2 MiB): 6.3 MiB, not 32.
    assert temp(None) < 2 * weight / 16 + 2 * block
    assert temp(1) >= weight
