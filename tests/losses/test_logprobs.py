"""token_logps, chunked_token_logps, sequence_logps, entropy_from_logits against float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rlhf_jax.losses import chunked_token_logps, entropy_from_logits, sequence_logps, token_logps

VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])


# ----------------------------------------------------------------- float64 NumPy references
def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    mx = z.max(axis=-1, keepdims=True)
    return z - mx - np.log(np.exp(z - mx).sum(axis=-1, keepdims=True))


def np_token_logps(logits, targets):
    lsm = np_log_softmax(logits)
    return np.take_along_axis(lsm, np.asarray(targets)[..., None], axis=-1)[..., 0]


def np_sequence_logps(lp, mask, average=False):
    lp = np.asarray(lp, np.float64)
    m = np.asarray(mask, np.float64)
    tot = np.where(m > 0, lp, 0.0).sum(-1)
    if average:
        tot = tot / np.maximum(m.sum(-1), 1.0)
    return tot


def np_entropy(logits):
    lsm = np_log_softmax(logits)
    p = np.exp(lsm)
    return -(np.where(p > 0, p * lsm, 0.0)).sum(-1)


def _data(seed, b=3, t=5, v=7, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((b, t, v))).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    return logits, targets


class TestTokenLogps:
    @VARIANTS
    @pytest.mark.parametrize("seed", [0, 1])
    def test_matches_numpy(self, variant, seed):
        logits, targets = _data(seed)
        out = variant(token_logps)(logits, targets)
        assert out.shape == (3, 5) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, np_token_logps(logits, targets), rtol=1e-5, atol=1e-5)

    @VARIANTS
    def test_rank2_input(self, variant):
        logits, targets = _data(2)
        out = variant(token_logps)(logits[:, 0], targets[:, 0])
        np.testing.assert_allclose(
            out, np_token_logps(logits[:, 0], targets[:, 0]), rtol=1e-5, atol=1e-5
        )

    def test_hand_worked(self):
        # logits [0, log 3] -> p = [1/4, 3/4]; target 1 -> log(3/4); target 0 -> log(1/4).
        logits = jnp.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)]]])
        out = token_logps(logits, jnp.array([[1, 0]]))
        np.testing.assert_allclose(out, [[np.log(0.75), np.log(0.25)]], rtol=1e-6)

    def test_bf16_computes_in_float32(self):
        logits, targets = _data(3)
        out = token_logps(jnp.asarray(logits, jnp.bfloat16), targets)
        assert out.dtype == jnp.float32
        ref = np_token_logps(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), targets)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    def test_check_grads(self):
        logits, targets = _data(4, b=2, t=2, v=4, scale=1.0)
        check_grads(lambda z: token_logps(z, targets), (jnp.asarray(logits),), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    @pytest.mark.parametrize("big", [1e4, -1e4])
    def test_extreme_logits_finite(self, big):
        logits, targets = _data(5)
        logits = logits.copy()
        logits[..., 0] = big
        out = token_logps(logits, targets)
        g = jax.grad(lambda z: token_logps(z, targets).sum())(jnp.asarray(logits))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
        np.testing.assert_allclose(out, np_token_logps(logits, targets), rtol=1e-5, atol=1e-3)

    def test_bad_rank(self):
        with pytest.raises(AssertionError, match="logits"):
            token_logps(jnp.zeros((2, 3, 4, 5)), jnp.zeros((2, 3, 4), jnp.int32))
        with pytest.raises(AssertionError, match="targets"):
            token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2,), jnp.int32))

    def test_mismatched_shapes(self):
        with pytest.raises(ValueError, match="targets.shape"):
            token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))


class TestChunkedTokenLogps:
    @VARIANTS
    @pytest.mark.parametrize("chunk_size", [1, 2, 5, 8])
    def test_matches_numpy_and_unchunked(self, variant, chunk_size):
        logits, targets = _data(10)
        fn = variant(functools.partial(chunked_token_logps, chunk_size=chunk_size))
        out = fn(logits, targets)
        assert out.shape == (3, 5)
        np.testing.assert_allclose(out, np_token_logps(logits, targets), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out, token_logps(logits, targets), rtol=1e-6, atol=1e-6)

    def test_hand_worked(self):
        # Uniform logits over 4 tokens: every log-prob is log(1/4) = -1.386294.
        out = chunked_token_logps(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 3]]), chunk_size=2)
        np.testing.assert_allclose(out, np.full((1, 3), -np.log(4.0)), rtol=1e-6)

    def test_gradient_matches_unchunked(self):
        logits, targets = _data(11)
        w = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
        g1 = jax.grad(lambda z: jnp.sum(w * chunked_token_logps(z, targets, chunk_size=2)))(
            jnp.asarray(logits))
        g2 = jax.grad(lambda z: jnp.sum(w * token_logps(z, targets)))(jnp.asarray(logits))
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)

    def test_check_grads(self):
        logits, targets = _data(12, b=1, t=3, v=3, scale=1.0)
        check_grads(lambda z: chunked_token_logps(z, targets, chunk_size=2),
                    (jnp.asarray(logits),), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_extreme_logits_finite(self):
        logits, targets = _data(13)
        logits = logits.copy()
        logits[..., 1] = 1e4
        logits[..., 2] = -1e4
        fn = lambda z: chunked_token_logps(z, targets, chunk_size=2)  # noqa: E731
        out = fn(logits)
        g = jax.grad(lambda z: fn(z).sum())(jnp.asarray(logits))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))

    @pytest.mark.parametrize("bad", [0, -1, 1.5])
    def test_bad_chunk_size(self, bad):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_token_logps(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), chunk_size=bad)

    def test_bad_rank(self):
        with pytest.raises(AssertionError, match="logits"):
            chunked_token_logps(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))

    def test_mismatched_shapes(self):
        with pytest.raises(ValueError, match="targets.shape"):
            chunked_token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 2), jnp.int32))


def _mask(seed, b=4, t=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[-1] = 0  # one fully masked row
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32), lengths


class TestSequenceLogps:
    @VARIANTS
    @pytest.mark.parametrize("average", [False, True])
    def test_matches_numpy(self, variant, average):
        rng = np.random.default_rng(20)
        lp = -np.abs(rng.standard_normal((4, 6))).astype(np.float32)
        mask, _ = _mask(21)
        out = variant(functools.partial(sequence_logps, average=average))(lp, mask)
        assert out.shape == (4,) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, np_sequence_logps(lp, mask, average), rtol=1e-6,
                                   atol=1e-6)

    def test_hand_worked(self):
        # Row 0: -1 + -2 (third token padded) = -3, average -1.5. Row 1: fully masked -> 0.
        lp = jnp.array([[-1.0, -2.0, -100.0], [-5.0, -5.0, -5.0]])
        mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
        np.testing.assert_allclose(sequence_logps(lp, mask), [-3.0, 0.0])
        np.testing.assert_allclose(sequence_logps(lp, mask, average=True), [-1.5, 0.0])

    @pytest.mark.parametrize("average", [False, True])
    def test_masked_equals_sliced(self, average):
        rng = np.random.default_rng(22)
        lp = rng.standard_normal((4, 6)).astype(np.float32)
        mask, lengths = _mask(23)
        lp_pad = np.where(mask > 0, lp, np.nan)  # garbage in the padding
        out = sequence_logps(lp_pad, mask, average=average)
        for b, n in enumerate(lengths):
            sliced = sequence_logps(lp[b:b + 1, :n], np.ones((1, n)), average=average)[0] \
                if n > 0 else 0.0
            np.testing.assert_allclose(out[b], sliced, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("average", [False, True])
    def test_padding_zero_grad_and_finite(self, average):
        rng = np.random.default_rng(24)
        lp = rng.standard_normal((4, 6)).astype(np.float32)
        mask, _ = _mask(25)
        lp = np.where(mask > 0, lp, -np.inf).astype(np.float32)
        g = jax.grad(lambda x: sequence_logps(x, mask, average=average).sum())(jnp.asarray(lp))
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[mask == 0] == 0.0)
        expected = 1.0 / np.maximum(mask.sum(-1, keepdims=True), 1) if average else 1.0
        np.testing.assert_allclose(np.asarray(g), mask * expected, rtol=1e-6)

    def test_check_grads(self):
        rng = np.random.default_rng(26)
        lp = jnp.asarray(rng.standard_normal((2, 3)))
        mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        check_grads(lambda x: sequence_logps(x, mask, average=True), (lp,), order=1,
                    modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)

    def test_bad_rank(self):
        with pytest.raises(AssertionError, match="token_logps"):
            sequence_logps(jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4)))

    def test_mismatched_shapes(self):
        with pytest.raises(AssertionError, match="mask"):
            sequence_logps(jnp.zeros((2, 3)), jnp.ones((2, 4)))


class TestEntropyFromLogits:
    @VARIANTS
    @pytest.mark.parametrize("shape", [(3, 5, 7), (4, 9)])
    def test_matches_numpy(self, variant, shape):
        logits = (2.0 * np.random.default_rng(30).standard_normal(shape)).astype(np.float32)
        out = variant(entropy_from_logits)(logits)
        assert out.shape == shape[:-1] and out.dtype == jnp.float32
        np.testing.assert_allclose(out, np_entropy(logits), rtol=1e-5, atol=1e-5)

    def test_hand_worked(self):
        # Uniform over 4 -> log 4 = 1.386294; one-hot (others -inf) -> 0;
        # p = [1/4, 3/4] -> -(1/4 log 1/4 + 3/4 log 3/4) = 0.562335.
        out = entropy_from_logits(jnp.array([[0.0, 0.0, 0.0, 0.0],
                                             [5.0, -jnp.inf, -jnp.inf, -jnp.inf]]))
        np.testing.assert_allclose(out, [np.log(4.0), 0.0], atol=1e-6)
        out2 = entropy_from_logits(jnp.array([[0.0, np.log(3.0)]]))
        np.testing.assert_allclose(out2, [0.5623351446188083], rtol=1e-6)

    def test_minus_inf_logits_zero_gradient(self):
        z = jnp.array([[1.0, 2.0, -jnp.inf, 0.5]])
        g = jax.grad(lambda x: entropy_from_logits(x).sum())(z)
        assert np.all(np.isfinite(g)) and g[0, 2] == 0.0

    def test_check_grads(self):
        z = jnp.asarray(np.random.default_rng(31).standard_normal((2, 2, 3)))
        check_grads(entropy_from_logits, (z,), order=1, modes=["rev"], eps=1e-2, atol=1e-2,
                    rtol=1e-2)

    @pytest.mark.parametrize("big", [1e4, -1e4])
    def test_extreme_logits_finite(self, big):
        z = np.random.default_rng(32).standard_normal((2, 3, 5)).astype(np.float32)
        z[..., 0] = big
        out = entropy_from_logits(z)
        g = jax.grad(lambda x: entropy_from_logits(x).sum())(jnp.asarray(z))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
        np.testing.assert_allclose(out, np_entropy(z), atol=1e-5)

    def test_bad_rank(self):
        with pytest.raises(AssertionError, match="logits"):
            entropy_from_logits(jnp.zeros((3,)))


@st.composite
def _logits_case(draw):
    b, t, v = 3, 4, 5  # fixed shapes: one compilation, contents vary
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((b, t, v)).astype(np.float32)
    spikes = rng.choice([0.0, 1e4, -1e4], size=(b, t, v))
    logits = np.where(spikes != 0, spikes, logits).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    return logits, targets, mask


@jax.jit
def _composite_value_and_grad(logits, targets, mask):
    def loss(z):
        lp = token_logps(z, targets)
        lp_chunked = chunked_token_logps(z, targets, chunk_size=3)
        return (sequence_logps(lp, mask).sum()
                + sequence_logps(lp_chunked, mask, average=True).sum()
                + jnp.sum(mask * entropy_from_logits(z)))

    return jax.value_and_grad(loss)(logits)


class TestHypothesis:
    @settings(max_examples=15)
    @given(_logits_case())
    def test_extreme_logits_and_masked_rows(self, case):
        logits, targets, mask = case
        value, g = _composite_value_and_grad(logits, targets, mask)
        assert np.isfinite(value) and np.all(np.isfinite(g))
        # Rows/positions that are masked out get exactly zero gradient.
        assert np.all(np.asarray(g)[mask == 0] == 0.0)
        lp = np.asarray(token_logps(logits, targets))
        ref = np_token_logps(logits, targets)
        np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(sequence_logps(lp, mask), np_sequence_logps(ref, mask),
                                   rtol=1e-5, atol=1e-1)
