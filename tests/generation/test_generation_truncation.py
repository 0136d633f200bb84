"""Stop-token helpers and best-of-n selection against NumPy references and hand-worked cases."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from rlhf_jax.generation import (
    contains_stop_token,
    first_true_indices,
    penalize_missing_eos,
    response_mask,
    select_best_of_n,
    truncate_response,
)

EOS, PAD = 2, 0


def ref_truncate(tokens, stop, pad, start=0):
    out = np.array(tokens, copy=True)
    mask = np.ones_like(out)
    for b, row in enumerate(out):
        hits = [t for t in range(start, len(row)) if row[t] == stop]
        if hits:
            out[b, hits[0] + 1 :] = pad
            mask[b, hits[0] + 1 :] = 0
    return out, mask


class TruncationTest(parameterized.TestCase):
    TOKENS = np.array(
        [
            [5, 6, 2, 7, 2],  # EOS at 2
            [2, 5, 5, 5, 5],  # EOS at 0
            [5, 6, 7, 8, 9],  # no EOS
            [5, 6, 7, 8, 2],  # EOS at the last position
        ],
        np.int32,
    )

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        out = self.variant(lambda t: truncate_response(t, stop_token_id=EOS, pad_token_id=PAD))(
            self.TOKENS
        )
        np.testing.assert_array_equal(
            out, [[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 6, 7, 8, 2]]
        )
        mask = self.variant(lambda t: response_mask(t, stop_token_id=EOS))(self.TOKENS)
        np.testing.assert_array_equal(
            mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
        )
        np.testing.assert_array_equal(first_true_indices(self.TOKENS == EOS), [2, 0, 5, 4])
        np.testing.assert_array_equal(
            contains_stop_token(self.TOKENS, stop_token_id=EOS), [True, True, False, True]
        )

    @parameterized.parameters(0, 1, 3)
    def test_matches_reference_with_start(self, start):
        tokens = np.random.default_rng(start).integers(0, 4, size=(50, 9)).astype(np.int32)
        ref_tokens, ref_mask = ref_truncate(tokens, EOS, PAD, start)
        kw = dict(stop_token_id=EOS, start=start)
        np.testing.assert_array_equal(truncate_response(tokens, pad_token_id=PAD, **kw), ref_tokens)
        np.testing.assert_array_equal(response_mask(tokens, **kw), ref_mask)
        np.testing.assert_array_equal(
            contains_stop_token(tokens, **kw), (tokens[:, start:] == EOS).any(1)
        )

    def test_start_ignores_early_stop(self):
        out = truncate_response(self.TOKENS[1:2], stop_token_id=EOS, pad_token_id=PAD, start=1)
        np.testing.assert_array_equal(out, self.TOKENS[1:2])

    def test_penalties(self):
        scores = jnp.array([1.0, -2.0, 3.0, 0.5])
        sub = penalize_missing_eos(scores, self.TOKENS, eos_token_id=EOS, penalty=1.5)
        np.testing.assert_allclose(sub, [1.0, -2.0, 1.5, 0.5])
        rep = penalize_missing_eos(scores, self.TOKENS, eos_token_id=EOS, replace_with=-1.0)
        np.testing.assert_allclose(rep, [1.0, -2.0, -1.0, 0.5])

    def test_penalty_needs_exactly_one_convention(self):
        for kw in ({}, {"penalty": 1.0, "replace_with": -1.0}):
            with self.assertRaisesRegex(ValueError, "exactly one of penalty"):
                penalize_missing_eos(jnp.zeros(4), self.TOKENS, eos_token_id=EOS, **kw)

    def test_negative_start_rejected(self):
        with self.assertRaisesRegex(ValueError, "start"):
            response_mask(self.TOKENS, stop_token_id=EOS, start=-1)


class SelectBestOfNTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        scores = jnp.array([0.1, 0.9, 0.5, -1.0, 2.0, 2.0])
        sel = self.variant(lambda s: select_best_of_n(s, num_samples=3))(scores)
        np.testing.assert_array_equal(sel.best_indices, [1, 4])  # first of the tied 2.0s
        np.testing.assert_array_equal(sel.worst_indices, [0, 3])
        np.testing.assert_allclose(sel.best_scores, [0.9, 2.0])
        np.testing.assert_allclose(sel.worst_scores, [0.1, -1.0])

    @parameterized.parameters(1, 2, 5)
    def test_matches_reference(self, n):
        scores = np.random.default_rng(n).normal(size=(7 * n,)).astype(np.float32)
        sel = select_best_of_n(jnp.asarray(scores), num_samples=n)
        groups = scores.reshape(7, n)
        np.testing.assert_array_equal(sel.best_indices, np.arange(7) * n + groups.argmax(1))
        np.testing.assert_array_equal(sel.worst_indices, np.arange(7) * n + groups.argmin(1))
        np.testing.assert_array_equal(sel.best_scores, groups.max(1))
        np.testing.assert_array_equal(sel.worst_scores, groups.min(1))

    def test_bad_group_size(self):
        with self.assertRaisesRegex(ValueError, "multiple of num_samples"):
            select_best_of_n(jnp.zeros(5), num_samples=2)
        with self.assertRaisesRegex(ValueError, "num_samples"):
            select_best_of_n(jnp.zeros(4), num_samples=0)
