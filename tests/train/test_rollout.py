"""Rollout layout, reward sources, minibatching and the shared online-trainer helpers."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.train import rollout as ro

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
            ro.positions_from_mask(_rollout().sequence_mask),
            [[0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 6]],
        )

    def test_response_logits_are_the_predicting_columns(self):
        # Column c of a forward pass predicts token c + 1; response token t sits at P + t.
        values = jnp.arange(14, dtype=jnp.float32).reshape(2, 7)
        np.testing.assert_array_equal(ro.response_logits(values, 3), values[:, 2:6])
        with pytest.raises(ValueError, match="prompt_length"):
            ro.response_logits(values, 0)

    def test_policy_response_logps_match_manual_indexing(self):
        """logps[b, t] = log softmax(logits[b, P - 1 + t] / T)[response[b, t]]."""
        vocab = 11
        table = jax.random.normal(jax.random.key(0), (7, vocab))

        def model(ids, attention_mask=None, positions=None):
            # logits depend on position and token, so misalignment would show
            return table[None, :, :] + 0.1 * ids[..., None].astype(jnp.float32)

        r = _rollout()
        logps, entropy = ro.policy_response_logps(model, r, temperature=0.7, with_entropy=True)
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
        out = ro.response_values(lambda ids, attention_mask=None, positions=None: values,
                                 _rollout())
        np.testing.assert_array_equal(out, values[:, 2:6])


class TestKLAndDiagnostics:
    def test_sequence_kl_is_masked_k1_sum(self):
        rng = np.random.default_rng(0)
        logps = rng.normal(size=(3, 5))
        ref = rng.normal(size=(3, 5))
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float64)
        expected = ((logps - ref) * mask).sum(-1)
        out = ro.sequence_kl_to_reference(jnp.asarray(logps, jnp.float32),
                                          jnp.asarray(ref, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    def test_explained_variance_matches_numpy(self):
        rng = np.random.default_rng(1)
        returns = rng.normal(size=(4, 6))
        values = returns + 0.3 * rng.normal(size=(4, 6))
        mask = (rng.uniform(size=(4, 6)) > 0.3).astype(np.float64)
        r, v = returns[mask > 0], values[mask > 0]
        expected = 1.0 - np.var(r - v) / (np.var(r) + 1e-8)
        out = ro.explained_variance(jnp.asarray(values, jnp.float32),
                                    jnp.asarray(returns, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(out, expected, rtol=1e-4)
        perfect = ro.explained_variance(jnp.asarray(returns, jnp.float32),
                                        jnp.asarray(returns, jnp.float32), jnp.asarray(mask))
        np.testing.assert_allclose(perfect, 1.0, atol=1e-6)


class TestRewardSources:
    def test_token_reward_function_gets_prompt_and_response(self):
        seen = {}

        def fn(prompt_ids, response_ids, response_mask):
            seen.update(p=prompt_ids, r=response_ids, m=response_mask)
            return response_mask.sum(-1).astype(np.float32)

        scores = ro.TokenRewardFunction(fn)(_rollout(), {})
        np.testing.assert_array_equal(scores, [3.0, 4.0])
        np.testing.assert_array_equal(seen["p"], [[PAD, 5, 6], [4, 5, 6]])
        np.testing.assert_array_equal(seen["r"], [[7, 8, EOS, PAD], [9, 9, 9, 9]])

    def test_text_reward_function_decodes_real_tokens(self):
        def decode(ids):
            return "".join(chr(ord("a") + i) for i in ids)

        def fn(prompts, responses):
            assert prompts == ["fg", "efg"]
            assert responses == ["hic", "jjjj"]
            return [float(len(r)) for r in responses]

        out = ro.TextRewardFunction(fn, decode=decode)(_rollout(), {})
        np.testing.assert_array_equal(out, [3.0, 4.0])

    def test_bad_scores_raise_naming_the_source(self):
        bad_shape = ro.TokenRewardFunction(lambda p, r, m: np.zeros(3), name="mine")
        with pytest.raises(ValueError, match="'mine' returned shape"):
            bad_shape(_rollout(), {})
        nan = ro.TokenRewardFunction(lambda p, r, m: np.array([0.0, np.nan]), name="nan_fn")
        with pytest.raises(ValueError, match="'nan_fn' returned non-finite scores at rows"):
            nan(_rollout(), {})

    def test_weighted_sum(self):
        a = ro.TokenRewardFunction(lambda p, r, m: np.array([1.0, 2.0]))
        b = ro.TokenRewardFunction(lambda p, r, m: np.array([10.0, -10.0]))
        out = ro.WeightedRewardSum([a, b], [0.5, 0.1])(_rollout(), {})
        np.testing.assert_allclose(out, [1.5, 0.0], atol=1e-6)
        with pytest.raises(ValueError, match="one weight per source"):
            ro.WeightedRewardSum([a, b], [1.0])

    def test_safety_gating_hand_cases(self):
        # Llama 2: R_s if flagged or R_s < 0.15, else R_h.
        helpful = jnp.array([0.9, 0.9, 0.9, 0.2])
        safety = jnp.array([0.5, 0.1, 0.5, 0.8])
        flag = jnp.array([False, False, True, False])
        out = ro.safety_gated_reward(helpful, safety, flag, threshold=0.15)
        np.testing.assert_allclose(out, [0.9, 0.1, 0.5, 0.2])

    def test_safety_gated_source_reads_the_flag_field(self):
        helpful = ro.TokenRewardFunction(lambda p, r, m: np.array([0.9, 0.9]))
        safety = ro.TokenRewardFunction(lambda p, r, m: np.array([0.5, 0.5]))
        gated = ro.SafetyGatedReward(helpful, safety, threshold=0.15, flag_key="unsafe")
        np.testing.assert_allclose(gated(_rollout(), {"unsafe": np.array([0, 1])}), [0.9, 0.5])
        np.testing.assert_allclose(gated(_rollout(), {}), [0.9, 0.9])

    def test_score_rollout_penalises_missing_eos_and_repeats_fields(self):
        seen = {}

        class Source:
            name = "fields"

            def __call__(self, rollout, prompts):
                seen.update(prompts)
                return jnp.array([1.0, 1.0])

        prompts = {"prompt_ids": np.zeros((1, 3), np.int32), "tag": np.array([7])}
        out = ro.score_rollout(Source(), _rollout(), prompts, num_samples=2,
                               missing_eos_penalty=0.25)
        np.testing.assert_allclose(out, [1.0, 0.75])
        np.testing.assert_array_equal(seen["tag"], [7, 7])

    def test_reward_model_source_reads_the_named_head(self):
        from rlhf_jax.models import ModelConfig, RewardModel

        config = ModelConfig.tiny_gpt2(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2,
                                       max_position_embeddings=16)
        rm = RewardModel(config, head_names=("helpful", "safe"), rngs=nnx.Rngs(0))
        r = _rollout()
        direct = rm(r.sequences, attention_mask=r.sequence_mask,
                    positions=ro.positions_from_mask(r.sequence_mask))
        out = ro.RewardModelSource(rm, head="safe")(r, {})
        np.testing.assert_allclose(out, direct[:, 1], rtol=1e-6)
        with pytest.raises(ValueError, match="not one of the reward model's heads"):
            ro.RewardModelSource(rm, head="honest")


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


class TestPromptLoader:
    def test_resume_continues_the_same_order(self):
        data = {"prompt_ids": np.arange(20).reshape(10, 2), "prompt_mask": np.ones((10, 2))}
        a = ro.PromptLoader(data, batch_size=3, seed=5)
        first = [next(a)["prompt_ids"] for _ in range(4)]
        state = a.get_state()
        rest = [next(a)["prompt_ids"] for _ in range(3)]
        b = ro.PromptLoader(data, batch_size=3, seed=5)
        b.set_state(state)
        for x, y in zip(rest, [next(b)["prompt_ids"] for _ in range(3)]):
            np.testing.assert_array_equal(x, y)
        # one epoch (3 full batches) covers 9 distinct rows
        assert len({int(r[0]) for batch in first[:3] for r in batch}) == 9

    def test_missing_field_raises(self):
        with pytest.raises(ValueError, match="missing 'prompt_mask'"):
            ro.PromptLoader({"prompt_ids": np.zeros((4, 2))}, batch_size=2)


class TestSamplingIntegration:
    def test_sample_rollout_truncates_and_masks(self):
        from rlhf_jax.models import CausalLM, ModelConfig

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
