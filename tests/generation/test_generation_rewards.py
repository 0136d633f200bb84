"""Reward sources: the one interface that scores sampled responses (best-of-n, rejection sampling,
the online trainers, the AI labelers), on hand-made rows and on real sampler output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from rlhf_jax.generation import (
    GenerationOutput,
    RewardModelSource,
    SafetyGatedReward,
    SamplingParams,
    TextRewardFunction,
    TokenRewardFunction,
    WeightedRewardSum,
    generate,
    place_reward_source,
    safety_gated_reward,
    score_samples,
    whiten_linear_scores,
)
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel, positions_from_mask
from rlhf_jax.sharding import MeshConfig, batch_sharding, make_mesh

# ---------------------------------------------------------------------------------------------
# Hand-made rows: P = 3 prompt columns, N = 4 response columns.
#   row 0: prompt [pad, 5, 6], response [7, 8, EOS=2, pad]   -> 3 response tokens, finished
#   row 1: prompt [4, 5, 6],   response [9, 9, 9, 9]         -> 4 response tokens, no EOS
# ---------------------------------------------------------------------------------------------

EOS, PAD = 2, 0


def _rows() -> GenerationOutput:
    seq = np.array([[PAD, 5, 6, 7, 8, EOS, PAD], [4, 5, 6, 9, 9, 9, 9]], np.int32)
    mask = np.array([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    zeros = jnp.zeros((2, 4), jnp.float32)
    return GenerationOutput(
        tokens=jnp.asarray(seq[:, 3:]), mask=jnp.asarray(mask[:, 3:]), logps=zeros,
        model_logps=zeros, sequences=jnp.asarray(seq), sequence_mask=jnp.asarray(mask),
        finished=jnp.asarray([True, False]), prompt_length=3,
    )


class TestTokenAndTextSources:
    def test_token_reward_function_gets_prompt_and_response(self):
        seen = {}

        def fn(prompt_ids, response_ids, response_mask):
            seen.update(p=prompt_ids, r=response_ids, m=response_mask)
            return response_mask.sum(-1).astype(np.float32)

        scores = TokenRewardFunction(fn)(_rows(), {})
        np.testing.assert_array_equal(scores, [3.0, 4.0])
        np.testing.assert_array_equal(seen["p"], [[PAD, 5, 6], [4, 5, 6]])
        np.testing.assert_array_equal(seen["r"], [[7, 8, EOS, PAD], [9, 9, 9, 9]])
        np.testing.assert_array_equal(seen["m"], [[1, 1, 1, 0], [1, 1, 1, 1]])

    def test_text_reward_function_decodes_real_tokens(self):
        def decode(ids):
            return "".join(chr(ord("a") + i) for i in ids)

        def fn(prompts, responses):
            assert prompts == ["fg", "efg"]
            assert responses == ["hic", "jjjj"]
            return [float(len(r)) for r in responses]

        out = TextRewardFunction(fn, decode=decode)(_rows(), {})
        np.testing.assert_array_equal(out, [3.0, 4.0])

    def test_bad_scores_raise_naming_the_source(self):
        bad_shape = TokenRewardFunction(lambda p, r, m: np.zeros(3), name="mine")
        with pytest.raises(ValueError, match="'mine' returned shape"):
            bad_shape(_rows(), {})
        nan = TokenRewardFunction(lambda p, r, m: np.array([0.0, np.nan]), name="nan_fn")
        with pytest.raises(ValueError, match="'nan_fn' returned non-finite scores at rows"):
            nan(_rows(), {})


class TestCombinations:
    def test_weighted_sum(self):
        a = TokenRewardFunction(lambda p, r, m: np.array([1.0, 2.0]))
        b = TokenRewardFunction(lambda p, r, m: np.array([10.0, -10.0]))
        out = WeightedRewardSum([a, b], [0.5, 0.1])(_rows(), {})
        np.testing.assert_allclose(out, [1.5, 0.0], atol=1e-6)
        with pytest.raises(ValueError, match="one weight per source"):
            WeightedRewardSum([a, b], [1.0])

    def test_safety_gating_hand_cases(self):
        # Llama 2: R_s if flagged or R_s < 0.15, else R_h.
        helpful = jnp.array([0.9, 0.9, 0.9, 0.2])
        safety = jnp.array([0.5, 0.1, 0.5, 0.8])
        flag = jnp.array([False, False, True, False])
        out = safety_gated_reward(helpful, safety, flag, threshold=0.15)
        np.testing.assert_allclose(out, [0.9, 0.1, 0.5, 0.2])

    def test_safety_gated_source_reads_the_flag_field(self):
        helpful = TokenRewardFunction(lambda p, r, m: np.array([0.9, 0.9]))
        safety = TokenRewardFunction(lambda p, r, m: np.array([0.5, 0.5]))
        gated = SafetyGatedReward(helpful, safety, threshold=0.15, flag_key="unsafe")
        np.testing.assert_allclose(gated(_rows(), {"unsafe": np.array([0, 1])}), [0.9, 0.5])
        np.testing.assert_allclose(gated(_rows(), {}), [0.9, 0.9])

    def test_logit_scale_gates_on_the_sigmoid(self):
        """The same decisions on logits as on their sigmoids (tau = 0.15 <=> logit -1.7346)."""
        rng = np.random.default_rng(0)
        helpful = rng.normal(size=64).astype(np.float32)
        safety = rng.normal(-1.5, 1.0, size=64).astype(np.float32)
        flag = rng.random(64) < 0.2
        p_h, p_s = 1 / (1 + np.exp(-helpful)), 1 / (1 + np.exp(-safety))
        on_logits = np.asarray(safety_gated_reward(helpful, safety, flag, threshold=0.15,
                                                   scale="logit"))
        on_probs = np.asarray(safety_gated_reward(p_h, p_s, flag, threshold=0.15))
        use_safety = flag | (p_s < 0.15)
        assert 0 < use_safety.sum() < 64 and (p_s < 0.15).sum() > flag.sum()
        np.testing.assert_array_equal(on_logits, np.where(use_safety, safety, helpful))
        np.testing.assert_allclose(1 / (1 + np.exp(-on_logits)), on_probs, rtol=1e-6)
        with pytest.raises(ValueError, match=r"threshold must be a probability in \(0, 1\)"):
            safety_gated_reward(helpful, safety, flag, threshold=1.5)
        with pytest.raises(ValueError, match="scale='linear'"):
            safety_gated_reward(helpful, safety, flag, scale="linear")

    @pytest.mark.parametrize("scale", ["probability", "logit"])
    def test_whiten_linear_scores_matches_a_float64_reference(self, scale):
        """Llama 2's WHITEN(LOGIT(R)): zero mean, unit (Bessel) variance of the linear score."""
        rng = np.random.default_rng(1)
        logits = rng.normal(0.3, 2.0, size=16)
        scores = 1 / (1 + np.exp(-logits)) if scale == "probability" else logits
        z = np.log(scores) - np.log1p(-scores) if scale == "probability" else scores
        expected = (z - z.mean()) / np.sqrt(z.var(ddof=1) + 1e-8)
        out = np.asarray(whiten_linear_scores(scores.astype(np.float32), scale=scale))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

    def test_whiten_extreme_and_degenerate_inputs(self):
        # probabilities of exactly 0 and 1 are clipped before the logit, so stay finite
        out = np.asarray(whiten_linear_scores(np.array([0.0, 1.0, 0.5], np.float32)))
        assert np.all(np.isfinite(out)) and out[0] < out[2] < out[1]
        # one row, or equal rows, whiten to 0
        np.testing.assert_array_equal(whiten_linear_scores(np.array([3.0]), scale="logit"), [0.0])
        np.testing.assert_allclose(whiten_linear_scores(np.full(4, 0.7)), 0.0, atol=1e-3)
        with pytest.raises(ValueError, match=r"scores must be \[B\]"):
            whiten_linear_scores(np.zeros((2, 2)))

    def test_gated_source_whitens_the_gated_score(self):
        helpful = TokenRewardFunction(lambda p, r, m: np.array([2.0, 0.5]))
        safety = TokenRewardFunction(lambda p, r, m: np.array([1.0, -3.0]))  # sigmoid(-3) < 0.15
        gated = SafetyGatedReward(helpful, safety, scale="logit", whiten=True)
        chosen = np.array([2.0, -3.0])
        expected = (chosen - chosen.mean()) / np.sqrt(chosen.var(ddof=1) + 1e-8)
        np.testing.assert_allclose(gated(_rows(), {}), expected, rtol=1e-5)
        with pytest.raises(ValueError, match=r"prompt field 'is_safety' has shape \(3,\)"):
            gated(_rows(), {"is_safety": np.zeros(3)})


class TestScoreSamples:
    def test_penalises_missing_eos_and_repeats_fields(self):
        seen = {}

        class Source:
            name = "fields"

            def __call__(self, responses, prompts):
                seen.update(prompts)
                return jnp.array([1.0, 1.0])

        prompts = {"prompt_ids": np.zeros((1, 3), np.int32), "tag": np.array([7])}
        out = score_samples(Source(), _rows(), prompts, num_samples=2, missing_eos_penalty=0.25)
        np.testing.assert_allclose(out, [1.0, 0.75])
        np.testing.assert_array_equal(seen["tag"], [7, 7])
        assert seen["prompt_ids"].shape == (2, 3)

    def test_wrong_shape_from_any_source_raises(self):
        class Device:
            name = "on_device"

            def __call__(self, responses, prompts):
                return jnp.zeros((3,))

        with pytest.raises(ValueError, match="'on_device' returned shape"):
            score_samples(Device(), _rows(), {})


@pytest.fixture(scope="module")
def reward_model():
    config = ModelConfig.tiny_gpt2(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2,
                                   max_position_embeddings=16)
    return RewardModel(config, head_names=("helpful", "safe"), rngs=nnx.Rngs(0))


class TestRewardModelSource:
    def test_reads_the_named_head(self, reward_model):
        rows = _rows()
        direct = reward_model(rows.sequences, attention_mask=rows.sequence_mask,
                              positions=positions_from_mask(rows.sequence_mask))
        out = RewardModelSource(reward_model, head="safe")(rows, {})
        np.testing.assert_allclose(out, direct[:, 1], rtol=1e-6)
        with pytest.raises(ValueError, match="not one of the reward model's heads"):
            RewardModelSource(reward_model, head="honest")

    def test_on_the_mesh_scores_global_rows_with_parameters_placed_once(self, reward_model):
        """Parameters placed by their logical names on the (2, 4) mesh, scores of rows sharded
        over it equal to the host model's, and placing again (or both heads of one placed model
        in a gated source) copies nothing."""
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        rows = _rows()
        tiled = rows._replace(**{name: jnp.tile(getattr(rows, name), (4,) + (1,) * (
            getattr(rows, name).ndim - 1)) for name in ("sequences", "sequence_mask", "finished")})
        placed = tiled._replace(**{name: jax.device_put(
            getattr(tiled, name), batch_sharding(mesh, getattr(tiled, name).ndim))
            for name in ("sequences", "sequence_mask", "finished")})
        on_host = RewardModelSource(reward_model, head="safe")
        on_mesh = RewardModelSource(reward_model, head="safe", mesh=mesh)
        leaves = jax.tree.leaves(on_mesh.state)
        assert all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
                   for x in leaves)
        assert any(not x.sharding.is_fully_replicated for x in leaves)  # sharded by its names
        scores = on_mesh(placed, {})
        assert isinstance(scores, jax.Array) and scores.shape == (8,)
        np.testing.assert_allclose(scores, on_host(tiled, {}), rtol=1e-5, atol=1e-6)
        on_mesh.place_on_mesh(mesh)
        assert all(a is b for a, b in zip(leaves, jax.tree.leaves(on_mesh.state), strict=True))

        from_placed = nnx.clone(reward_model)
        nnx.update(from_placed, on_mesh.state)
        gated = place_reward_source(SafetyGatedReward(
            RewardModelSource(from_placed, head="helpful"), RewardModelSource(from_placed,
                                                                              head="safe"),
            scale="logit"), mesh)
        assert all(a is b for a, b in zip(jax.tree.leaves(gated.helpfulness.state),
                                          jax.tree.leaves(gated.safety.state), strict=True))
        assert all(a is b for a, b in zip(leaves, jax.tree.leaves(gated.safety.state),
                                          strict=True))
        np.testing.assert_allclose(score_samples(gated, placed, {}),
                                   score_samples(gated, tiled, {}), rtol=1e-6)

    def test_scores_sampler_output_at_the_last_real_token(self, reward_model):
        policy = CausalLM(ModelConfig.tiny_gpt2(vocab_size=16, hidden_size=16, num_layers=1,
                                                num_heads=2, max_position_embeddings=16),
                          rngs=nnx.Rngs(1))
        prompt_ids = np.array([[0, 3, 4], [5, 6, 7]], np.int32)
        prompt_mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
        out = generate(policy, prompt_ids, prompt_mask, SamplingParams(max_new_tokens=5, greedy=True),
                       eos_token_id=2, pad_token_id=0)
        scores = RewardModelSource(reward_model, head=0)(out, {})
        # The same rows scored one at a time, cut at their last real token, left-aligned.
        for b in range(2):
            keep = np.asarray(out.sequence_mask[b]).astype(bool)
            ids = np.asarray(out.sequences[b])[keep][None]
            alone = reward_model(jnp.asarray(ids), attention_mask=jnp.ones_like(ids))
            np.testing.assert_allclose(scores[b], alone[0, 0], rtol=1e-5, atol=1e-6)
