"""Sampling filters and token sampling against float64 NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from rlhf_jax.generation import (
    apply_temperature,
    categorical_inverse_cdf,
    filter_logits,
    min_p_filter,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

# ---------------------------------------------------------------- float64 NumPy references


def _softmax64(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    z = np.where(finite, x - np.max(np.where(finite, x, -np.inf), -1, keepdims=True), -np.inf)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref_top_k(logits, k):
    logits = np.asarray(logits, np.float64)
    kth = np.sort(logits, -1)[..., ::-1][..., min(k, logits.shape[-1]) - 1 : min(k, logits.shape[-1])]
    return np.where(logits < kth, -np.inf, logits)


def ref_top_p(logits, p):
    # Hugging Face's formulation: sort ascending, remove tokens whose cumulative mass is
    # <= 1 - p, always keep the most likely token.
    logits = np.asarray(logits, np.float64)
    out = logits.copy()
    for row in np.ndindex(logits.shape[:-1]):
        order = np.argsort(logits[row], kind="stable")
        cum = np.cumsum(_softmax64(logits[row])[order])
        remove = cum <= 1 - p
        remove[-1] = False
        out[row][order[remove]] = -np.inf
    return out


def ref_min_p(logits, m):
    logits = np.asarray(logits, np.float64)
    probs = _softmax64(logits)
    return np.where(probs < m * probs.max(-1, keepdims=True), -np.inf, logits)


def ref_filter(logits, *, temperature, top_k=None, top_p=None, min_p=None):
    out = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        out = ref_top_k(out, top_k)
    if top_p is not None:
        out = ref_top_p(out, top_p)
    if min_p is not None:
        out = ref_min_p(out, min_p)
    return out


def _random_logits(seed, shape=(6, 33), scale=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _kept(x):
    return np.isfinite(np.asarray(x))


# Hand-worked distribution p = (0.5, 0.3, 0.2) (plus one impossible token for the min-p case).
_HAND = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))


class FilterTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_temperature(self):
        logits = _random_logits(0)
        out = self.variant(lambda x: apply_temperature(x, temperature=0.7))(logits)
        np.testing.assert_allclose(out, logits.astype(np.float64) / 0.7, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 2, 5, 33, 100)
    def test_top_k_matches_reference(self, k):
        logits = _random_logits(k)
        out = self.variant(lambda x: top_k_filter(x, top_k=k))(logits)
        np.testing.assert_array_equal(_kept(out), _kept(ref_top_k(logits, k)))
        np.testing.assert_array_equal(np.asarray(out)[_kept(out)], logits[_kept(out)])
        self.assertTrue(np.all(_kept(out).sum(-1) == min(k, 33)))

    def test_top_k_keeps_ties(self):
        logits = jnp.array([[1.0, 3.0, 3.0, 0.0]])
        np.testing.assert_array_equal(_kept(top_k_filter(logits, top_k=1)), [[0, 1, 1, 0]])

    @parameterized.parameters(0, -1, 1.5, True)
    def test_top_k_rejects_bad_values(self, k):
        with self.assertRaisesRegex(ValueError, "top_k"):
            top_k_filter(jnp.zeros((1, 4)), top_k=k)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.05, 0.3, 0.5, 0.9, 0.99, 1.0)
    def test_top_p_matches_reference(self, p):
        logits = _random_logits(int(p * 100))
        out = self.variant(lambda x: top_p_filter(x, top_p=p))(logits)
        np.testing.assert_array_equal(_kept(out), _kept(ref_top_p(logits, p)))
        np.testing.assert_array_equal(np.asarray(out)[_kept(out)], logits[_kept(out)])

    @parameterized.parameters((0.45, [1, 0, 0]), (0.6, [1, 1, 0]), (0.75, [1, 1, 0]), (0.85, [1, 1, 1]))
    def test_top_p_hand_worked(self, p, kept):
        # mass strictly before each token (sorted): 0, 0.5, 0.8; kept iff < p.
        np.testing.assert_array_equal(_kept(top_p_filter(jnp.asarray(_HAND), top_p=p)), [kept])

    def test_top_p_keeps_ties_with_the_last_kept_token(self):
        # p = (0.47, 0.47, 0.06): the second token's mass before it (0.47) is >= 0.3, but it
        # ties with the first (kept) token, so it is kept too.
        logits = jnp.array([[2.0, 2.0, -0.5], [-0.5, 2.0, 2.0]])
        np.testing.assert_array_equal(_kept(top_p_filter(logits, top_p=0.3)),
                                      [[1, 1, 0], [0, 1, 1]])

    def test_signed_zeros_are_one_value(self):
        # -0.0 == 0.0: a top-1 cut keeps both (a tie), as the float comparison does.
        logits = jnp.array([[-0.0, 0.0, -5.0, -1.0]])
        np.testing.assert_array_equal(_kept(top_k_filter(logits, top_k=1)), [[1, 1, 0, 0]])
        np.testing.assert_array_equal(_kept(top_p_filter(logits, top_p=0.2)), [[1, 1, 0, 0]])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1, 0.05), (7, 0.5), (300, 0.9), (4999, 0.999))
    def test_large_vocabulary_matches_reference(self, k, p):
        # 5,000 tokens with -inf entries, repeated values and a wide range (the cut-offs are
        # found by bisection over the float order, not by sorting).
        rng = np.random.default_rng(k)
        logits = (rng.standard_normal((3, 5000)) * rng.choice([0.5, 4.0, 30.0], (3, 1)))
        logits = np.round(logits, 1).astype(np.float32)  # many exact ties
        logits[:, rng.choice(5000, 200, replace=False)] = -np.inf
        out_k = self.variant(lambda x: top_k_filter(x, top_k=k))(logits)
        np.testing.assert_array_equal(_kept(out_k), _kept(ref_top_k(logits, k)))
        out_p = self.variant(lambda x: top_p_filter(x, top_p=p))(logits)
        # The reference keeps part of a tie group in its sort order; the filter keeps every
        # token tied with the last kept one (documented).
        last_kept = np.min(np.where(_kept(ref_top_p(logits, p)), logits, np.inf), -1, keepdims=True)
        np.testing.assert_array_equal(_kept(out_p), logits >= last_kept)
        np.testing.assert_array_equal(np.asarray(out_p)[_kept(out_p)], logits[_kept(out_p)])

    def test_order_keys_follow_float_order(self):
        from rlhf_jax.generation._sampling import _order_keys

        # (No subnormals: XLA on CPU compares them as zero.)
        values = np.array([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-37, 2.0, 3e38, np.inf],
                          np.float32)
        keys = np.asarray(_order_keys(jnp.asarray(values))).astype(np.int64)
        self.assertEqual(keys[4], keys[5])  # -0.0 and 0.0
        distinct = np.delete(keys, 4)
        self.assertTrue(np.all(np.diff(distinct) > 0), distinct)
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype(np.float32)
        kx = np.asarray(_order_keys(jnp.asarray(x))).astype(np.int64)
        np.testing.assert_array_equal(np.sign(kx[:, None] - kx[None, :500]),
                                      np.sign(x[:, None] - x[None, :500]))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.0, 0.01, 0.1, 0.5, 1.0)
    def test_min_p_matches_reference(self, m):
        logits = _random_logits(int(m * 100) + 7)
        out = self.variant(lambda x: min_p_filter(x, min_p=m))(logits)
        np.testing.assert_array_equal(_kept(out), _kept(ref_min_p(logits, m)))

    @parameterized.parameters((0.5, [1, 1, 0]), (0.7, [1, 0, 0]), (0.39, [1, 1, 1]))
    def test_min_p_hand_worked(self, m, kept):
        # threshold m * 0.5: keeps p >= 0.25 for m=0.5, p >= 0.35 for m=0.7, p >= 0.195 for 0.39.
        np.testing.assert_array_equal(_kept(min_p_filter(jnp.asarray(_HAND), min_p=m)), [kept])

    @chex.variants(with_jit=True, without_jit=True)
    def test_composition_order_matches_reference(self):
        logits = _random_logits(11, shape=(16, 40))
        kw = dict(temperature=0.8, top_k=12, top_p=0.8, min_p=0.05)
        out = self.variant(lambda x: filter_logits(x, **kw))(logits)
        ref = ref_filter(logits, **kw)
        np.testing.assert_array_equal(_kept(out), _kept(ref))
        np.testing.assert_allclose(np.asarray(out)[_kept(out)], ref[_kept(ref)], rtol=1e-6)

    def test_extreme_logits_stay_finite(self):
        logits = jnp.array([[1e30, -1e30, 0.0, 5.0], [-jnp.inf, 2.0, -jnp.inf, 1.0]])
        out = filter_logits(logits, temperature=1e-3, top_k=3, top_p=0.9, min_p=0.1)
        logp = jax.nn.log_softmax(out, -1)
        self.assertTrue(np.all(np.isfinite(np.asarray(logp)[_kept(out)])))
        self.assertTrue(np.all(_kept(out).sum(-1) >= 1))


class SampleTokensTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=4),
        dict(temperature=1.3, top_p=0.7),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    )
    def test_frequencies_follow_filtered_softmax(self, **kw):
        num_rows, vocab = 20_000, 8
        row = np.random.default_rng(3).normal(size=(vocab,)).astype(np.float32) * 1.5
        logits = jnp.broadcast_to(jnp.asarray(row), (num_rows, vocab))
        tokens, logps, _ = jax.jit(lambda x, k: sample_tokens(x, k, **kw))(logits, jax.random.key(0))
        freq = np.bincount(np.asarray(tokens), minlength=vocab) / num_rows
        probs = _softmax64(ref_filter(row[None], **kw))[0]
        # Each frequency is Binomial(n, p) / n with standard deviation sqrt(p (1 - p) / n) <= 0.0036
        # for n = 20000. A 5-sigma band per token fails with probability < 6e-7 each, < 5e-6 over the
        # 8 tokens (union bound), so a failure means the sampler draws from a different law.
        # Removed tokens (p = 0) must never be drawn.
        sigma = np.sqrt(probs * (1 - probs) / num_rows)
        np.testing.assert_array_less(np.abs(freq - probs), 5 * sigma + 1e-12)
        np.testing.assert_array_equal(freq[probs == 0], 0.0)
        np.testing.assert_allclose(logps, np.log(probs[np.asarray(tokens)]), atol=2e-5)

    @parameterized.parameters(dict(vocab=8, block=1024), dict(vocab=2_500, block=256))
    def test_inverse_cdf_draws_follow_softmax(self, vocab, block):
        # vocab=2500 with block=256 takes the two-level path (10 blocks, the last one padded).
        # The mass sits on 9 tokens spread over the blocks, including the first and last id;
        # every other token has probability 0 (or ~1e-30) and must never be drawn.
        num_rows = 20_000
        kept = np.unique(np.linspace(0, vocab - 1, 9).astype(int))
        row = np.full((vocab,), -np.inf, np.float32)
        row[kept] = np.random.default_rng(5).normal(size=kept.size) * 1.2
        if vocab > 8:
            row[1] = -70.0  # p ~ 1e-30: allowed but practically never drawn
        logits = jnp.broadcast_to(jnp.asarray(row), (num_rows, vocab))
        draw = jax.jit(lambda x, k: categorical_inverse_cdf(k, x, block=block))
        tokens = np.asarray(draw(logits, jax.random.key(2)))
        freq = np.bincount(tokens, minlength=vocab) / num_rows
        probs = _softmax64(row[None].astype(np.float64))[0]
        # Same 5-sigma band as above: a per-token failure probability below 6e-7.
        sigma = np.sqrt(probs * (1 - probs) / num_rows)
        np.testing.assert_array_less(np.abs(freq - probs), 5 * sigma + 1e-12)
        self.assertEqual(freq[probs < 1e-20].sum(), 0.0)
        self.assertTrue(np.all((tokens >= 0) & (tokens < vocab)))

    def test_inverse_cdf_last_partial_block_excludes_the_block_before(self):
        # vocab 2,500 in blocks of 256: the last block is ids 2304..2499 and is read as the
        # window 2244..2499. Token 2250 (block 8, inside that window) and token 2499 (block 9)
        # are equally likely; drawing 2250 from the last block's window would skew it to 3/4.
        num_rows = 20_000
        row = np.full((2_500,), -np.inf, np.float32)
        row[[2250, 2499]] = 0.0
        logits = jnp.broadcast_to(jnp.asarray(row), (num_rows, 2_500))
        tokens = np.asarray(jax.jit(lambda x, k: categorical_inverse_cdf(k, x, block=256))(
            logits, jax.random.key(4)))
        self.assertEqual(set(np.unique(tokens)), {2250, 2499})
        # 5 sigma of a fair coin over 20,000 draws: 0.0177.
        self.assertLess(abs(np.mean(tokens == 2250) - 0.5), 5 * np.sqrt(0.25 / num_rows))

    def test_inverse_cdf_first_token_with_zero_probability_is_never_drawn(self):
        # A threshold of exactly 0 would pick id 0; the uniforms are drawn in (0, 1].
        logits = jnp.asarray([[-jnp.inf, 0.0, -jnp.inf, 1.0]] * 4096)
        for block in (1024, 2):
            tokens = np.asarray(categorical_inverse_cdf(jax.random.key(7), logits, block=block))
            self.assertTrue(set(np.unique(tokens)) <= {1, 3})

    def test_logps_and_model_logps(self):
        logits = jnp.asarray(_random_logits(5, shape=(32, 16)))
        tokens, logps, model_logps = sample_tokens(
            logits, jax.random.key(1), temperature=0.5, top_k=3
        )
        with np.errstate(divide="ignore"):
            ref = np.log(_softmax64(ref_filter(logits, temperature=0.5, top_k=3)))
        ref_model = np.log(_softmax64(logits))
        idx = np.arange(32), np.asarray(tokens)
        np.testing.assert_allclose(logps, ref[idx], atol=2e-5)
        np.testing.assert_allclose(model_logps, ref_model[idx], atol=2e-5)
        self.assertTrue(np.all(np.isfinite(ref[idx])))  # only kept tokens are drawn

    def test_greedy_is_argmax_and_deterministic(self):
        logits = jnp.asarray(_random_logits(6, shape=(10, 20)))
        a = sample_tokens(logits, jax.random.key(0), greedy=True, temperature=0.3)
        b = sample_tokens(logits, jax.random.key(9), greedy=True, temperature=0.3)
        np.testing.assert_array_equal(a[0], np.argmax(np.asarray(logits), -1))
        chex.assert_trees_all_equal(a, b)

    def test_same_key_same_tokens(self):
        logits = jnp.asarray(_random_logits(8, shape=(64, 20)))
        a = sample_tokens(logits, jax.random.key(4))[0]
        b = sample_tokens(logits, jax.random.key(4))[0]
        c = sample_tokens(logits, jax.random.key(5))[0]
        np.testing.assert_array_equal(a, b)
        self.assertFalse(np.array_equal(a, c))

