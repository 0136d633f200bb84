"""The rollout layout, the response-aligned log-probs and values read from it, the sequence KL
of every online trainer, minibatching and sampling (`rollout.py`, `logprobs.py`, `value.py`,
`online.py`)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.generation import SamplingParams, generate
from rlhf_jax.models import CausalLM, ModelConfig, positions_from_mask
from rlhf_jax.train import rollout as ro
from rlhf_jax.train.logprobs import policy_response_logps, response_logits
from rlhf_jax.train.online import sequence_kl_to_reference
from rlhf_jax.train.value import explained_variance, response_values

# ---------------------------------------------------------------------------------------------
# A tiny hand-made rollout: P = 3 prompt columns, N = 4 response columns.
#   row 0: prompt [pad, 5, 6], response [7, 8, EOS=2, pad]   -> 3 response tokens, finished
#   row 1: prompt [4, 5, 6],   response [9, 9, 9, 9]         -> 4 response tokens, no EOS
# ---------------------------------------------------------------------------------------------

EOS, PAD = 2, 0


def _rollout() -> ro.Rollout:
    seq = np.array([[PAD, 5, 6, 7, 8, EOS, PAD], [4, 5, 6, 9, 9, 9, 9]], np.int32)
    mask = np.array([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    return ro.Rollout(
        sequences=jnp.asarray(seq),
        sequence_mask=jnp.asarray(mask),
        response_ids=jnp.asarray(seq[:, 3:]),
        response_mask=jnp.asarray(mask[:, 3:]),
        finished=jnp.asarray([True, False]),
    )


class TestLayout:
    def test_prompt_views(self):
        r = _rollout()
        assert r.prompt_length == 3
        np.testing.assert_array_equal(r.prompt_ids, [[PAD, 5, 6], [4, 5, 6]])
        np.testing.assert_array_equal(r.prompt_mask, [[0, 1, 1], [1, 1, 1]])

    def test_positions_from_mask(self):
        np.testing.assert_array_equal(
            positions_from_mask(_rollout().sequence_mask),
            [[0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 6]],
        )

    def test_response_logits_are_the_predicting_columns(self):
        # Column c of a forward pass predicts token c + 1; response token t sits at P + t.
        values = jnp.arange(14, dtype=jnp.float32).reshape(2, 7)
        np.testing.assert_array_equal(response_logits(values, 3), values[:, 2:6])
        with pytest.raises(ValueError, match="prompt_length"):
            response_logits(values, 0)

    def test_policy_response_logps_match_manual_indexing(self):
        """logps[b, t] = log softmax(logits[b, P - 1 + t] / T)[response[b, t]]."""
        vocab = 11
        table = jax.random.normal(jax.random.key(0), (7, vocab))

        def model(ids, attention_mask=None, positions=None):
            # logits depend on position and token, so misalignment would show
            return table[None, :, :] + 0.1 * ids[..., None].astype(jnp.float32)

        r = _rollout()
        logps, entropy = policy_response_logps(model, r, temperature=0.7, with_entropy=True)
        logits = np.asarray(model(r.sequences), np.float64) / 0.7
        expected = np.zeros((2, 4))
        ent = np.zeros((2, 4))
        for b in range(2):
            for t in range(4):
                row = logits[b, 3 - 1 + t]
                logz = np.log(np.exp(row - row.max()).sum()) + row.max()
                expected[b, t] = row[int(r.response_ids[b, t])] - logz
                p = np.exp(row - logz)
                ent[b, t] = -(p * (row - logz)).sum()
        np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy, ent, rtol=1e-5, atol=1e-5)

    def test_response_values(self):
        values = jnp.arange(14, dtype=jnp.float32).reshape(2, 7)
        out = response_values(lambda ids, attention_mask=None, positions=None: values,
                                 _rollout())
        np.testing.assert_array_equal(out, values[:, 2:6])


class TestKLAndDiagnostics:
    def test_sequence_kl_is_masked_k1_sum(self):
        rng = np.random.default_rng(0)
        logps = rng.normal(size=(3, 5))
        ref = rng.normal(size=(3, 5))
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float64)
        expected = ((logps - ref) * mask).sum(-1)
        out = sequence_kl_to_reference(jnp.asarray(logps, jnp.float32),
                                          jnp.asarray(ref, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_explained_variance_matches_numpy(self):
        rng = np.random.default_rng(1)
        returns = rng.normal(size=(4, 6))
        values = returns + 0.3 * rng.normal(size=(4, 6))
        mask = (rng.uniform(size=(4, 6)) > 0.3).astype(np.float64)
        r, v = returns[mask > 0], values[mask > 0]
        expected = 1.0 - np.var(r - v) / (np.var(r) + 1e-8)
        out = explained_variance(jnp.asarray(values, jnp.float32),
                                    jnp.asarray(returns, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(out, expected, rtol=1e-4)
        perfect = explained_variance(jnp.asarray(returns, jnp.float32),
                                        jnp.asarray(returns, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(perfect, 1.0, atol=1e-6)


class TestMinibatches:
    def test_each_epoch_is_a_permutation(self):
        idx = np.asarray(ro.minibatch_indices(jax.random.key(3), batch_size=12,
                                              num_minibatches=3, num_epochs=2))
        assert idx.shape == (6, 4)
        for epoch in range(2):
            np.testing.assert_array_equal(np.sort(idx[3 * epoch: 3 * epoch + 3].ravel()),
                                          np.arange(12))
        assert not np.array_equal(idx[:3], idx[3:])

    def test_indivisible_batch_raises(self):
        with pytest.raises(ValueError, match="num_minibatches=5 must divide"):
            ro.minibatch_indices(jax.random.key(0), batch_size=12, num_minibatches=5,
                                 num_epochs=1)

    def test_take_minibatch_gathers_every_leaf(self):
        tree = {"a": jnp.arange(6), "b": jnp.arange(12).reshape(6, 2)}
        out = ro.take_minibatch(tree, jnp.array([4, 1]))
        np.testing.assert_array_equal(out["a"], [4, 1])
        np.testing.assert_array_equal(out["b"], [[8, 9], [2, 3]])


class TestSamplingIntegration:
    def test_sample_rollout_truncates_and_masks(self):
        config = ModelConfig.tiny_gpt2(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                       max_position_embeddings=32)
        graphdef, state = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)))
        prompts = np.array([[0, 3, 4], [5, 6, 7]], np.int32)
        mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
        r = ro.sample_rollout(graphdef, state, prompts, mask, rng=jax.random.key(0),
                              config=ro.RolloutConfig(max_new_tokens=6), eos_token_id=2,
                              pad_token_id=0, num_samples=3)
        chex.assert_shape(r.sequences, (6, 9))
        chex.assert_shape(r.response_mask, (6, 6))
        np.testing.assert_array_equal(r.prompt_ids, np.repeat(prompts, 3, axis=0))
        ids, m = np.asarray(r.response_ids), np.asarray(r.response_mask)
        for row in range(6):
            hits = np.flatnonzero(ids[row] == 2)
            if hits.size:
                assert m[row].sum() == hits[0] + 1 and bool(r.finished[row])
                assert np.all(ids[row, hits[0] + 1:] == 0)
            else:
                assert m[row].sum() == 6 and not bool(r.finished[row])

    def test_rollout_config_is_the_sampling_params_of_generate(self):
        """Every `SamplingParams` field of the rollout config reaches the sampler: a filtered,
        tempered rollout is the `generate` output for the same parameters; a stop token other
        than EOS cuts the response while `finished` still means "produced EOS"."""
        config = ModelConfig.tiny_gpt2(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                       max_position_embeddings=32)
        model = CausalLM(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        prompts = np.array([[0, 3, 4], [5, 6, 7]], np.int32)
        mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
        rollout_config = ro.RolloutConfig(max_new_tokens=5, temperature=0.7, top_k=5, top_p=0.9,
                                          min_p=0.02, cache_segments=2)
        assert isinstance(rollout_config, SamplingParams)
        r = ro.sample_rollout(graphdef, state, prompts, mask, rng=jax.random.key(3),
                              config=rollout_config, eos_token_id=2, pad_token_id=0,
                              num_samples=2)
        sampling = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=5, top_p=0.9,
                                  min_p=0.02, cache_segments=2)
        out = generate(model, prompts, mask, sampling, rng=jax.random.key(3), eos_token_id=2,
                       pad_token_id=0, num_samples=2)
        np.testing.assert_array_equal(r.sequences, out.sequences)
        np.testing.assert_array_equal(r.response_mask, out.mask)
        stop = int(np.asarray(out.tokens)[0, 0])
        cut = ro.sample_rollout(graphdef, state, prompts, mask, rng=jax.random.key(3),
                                config=dataclasses.replace(rollout_config, stop_token_id=stop),
                                eos_token_id=2, pad_token_id=0, num_samples=2)
        assert int(cut.response_mask[0].sum()) == 1
        np.testing.assert_array_equal(
            cut.finished,
            np.any((np.asarray(cut.response_ids) == 2) & (np.asarray(cut.response_mask) > 0), -1))
