"""The prefill + decode sampler against full forwards of the real CausalLM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.bench.compiles import CompileCounter
from rlhf_jax.generation import (
    GenerationOutput,
    RewardModelSource,
    Sampler,
    SamplingParams,
    TokenRewardFunction,
    WeightedRewardSum,
    best_of_n,
    filter_logits,
    generate,
    generate_with_state,
    response_mask,
    truncate_response,
)
from rlhf_jax.generation._sampler import auto_cache_segments, grow_cache, segment_ends
from rlhf_jax.models import CausalLM, ModelConfig, RewardModel
from rlhf_jax.sharding import MeshConfig, gather_to_host, make_mesh, shard_model, shard_state

PAD = 0
N_NEW = 7
# Left-padded prompts of real lengths 6, 3, 1, 4, 6, 2, 5, 3 (token ids >= 1).
LENGTHS = (6, 3, 1, 4, 6, 2, 5, 3)
P = 6
FILTERS = dict(temperature=0.8, top_k=20, top_p=0.95, min_p=0.01)
SAMPLING = SamplingParams(max_new_tokens=N_NEW, **FILTERS)
GREEDY = SamplingParams(max_new_tokens=N_NEW, greedy=True)
N_SAMPLES = 2


@pytest.fixture(scope="module")
def model():
    config = ModelConfig.tiny_gpt2(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2)
    return CausalLM(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = np.zeros((len(LENGTHS), P), np.int32)
    mask = np.zeros((len(LENGTHS), P), np.int32)
    for b, n in enumerate(LENGTHS):
        ids[b, P - n :] = rng.integers(1, 64, size=n)
        mask[b, P - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model)


@pytest.fixture(scope="module")
def sampled(sampler, prompts):
    """Sampled output without early stop, with filters and two samples per prompt."""
    return sampler.generate(
        *prompts, SAMPLING, rng=jax.random.key(7), eos_token_id=None, pad_token_id=PAD,
        num_samples=N_SAMPLES,
    )


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def full_forward_logits(model, sequences, sequence_mask):
    """Logits [B, P + N, V] of a plain forward pass (no cache) over prompt + response."""
    return np.asarray(_forward(model, jnp.asarray(sequences), jnp.asarray(sequence_mask)))


def argmax_loop_without_cache(model, ids, mask, n_new, eos):
    """Greedy decoding by repeated full forwards over a fixed [B, P + N] buffer.

    Causal attention makes the not-yet-written (masked) right part irrelevant to position t, so a
    single compiled forward serves every step.
    """
    b, p = ids.shape
    seq = np.concatenate([ids, np.full((b, n_new), PAD, np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((b, n_new), np.int32)], 1)
    done = np.zeros(b, bool)
    for t in range(n_new):
        logits = full_forward_logits(model, seq, seq_mask)
        nxt = logits[:, p + t - 1].argmax(-1)
        seq[:, p + t] = np.where(done, PAD, nxt)
        seq_mask[:, p + t] = 1
        if eos is not None:
            done |= nxt == eos
    return seq[:, p:]


class DecodeOnly(nnx.Module):
    """A model with only the decoding protocol (``init_cache``, ``decode`` -> logits of every
    position): the sampler runs it as it is, without the ``CausalLM`` head path."""

    def __init__(self, inner):
        self.inner = inner

    def init_cache(self, batch_size, max_length, dtype=None):
        return self.inner.init_cache(batch_size, max_length, dtype)

    def decode(self, input_ids, *, positions, cache, cache_mask):
        return self.inner.decode(input_ids, positions=positions, cache=cache,
                                 cache_mask=cache_mask)


class TestGreedy:
    def test_matches_argmax_loop_without_cache(self, model, prompts):
        out = generate(model, *prompts, GREEDY, eos_token_id=None, pad_token_id=PAD)
        expected = argmax_loop_without_cache(model, *prompts, N_NEW, eos=None)
        np.testing.assert_array_equal(out.tokens, expected)
        np.testing.assert_array_equal(out.mask, np.ones_like(expected))

    def test_decode_only_model_samples_what_the_causal_lm_samples(self, model, prompts):
        # The tied head (GPT-2) runs on a transposed copy of the embedding in the CausalLM path.
        assert model.unembedding().layout == "ve"
        kw = dict(rng=jax.random.key(3), eos_token_id=None, pad_token_id=PAD)
        out = generate(model, *prompts, SAMPLING, **kw)
        plain = generate(DecodeOnly(model), *prompts, SAMPLING, **kw)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
        np.testing.assert_allclose(out.logps, plain.logps, rtol=1e-5, atol=1e-5)

    def test_rope_gqa_model_matches_argmax_loop(self, prompts):
        # Llama layout: RoPE positions from the left-padded mask, 4 query heads over 2 KV heads.
        config = ModelConfig.tiny_llama(vocab_size=64, hidden_size=32, num_heads=4,
                                        num_kv_heads=2, intermediate_size=64)
        llama = CausalLM(config, rngs=nnx.Rngs(1))
        out = generate(llama, *prompts, GREEDY, eos_token_id=None, pad_token_id=PAD)
        np.testing.assert_array_equal(
            out.tokens, argmax_loop_without_cache(llama, *prompts, N_NEW, eos=None)
        )

    def test_eos_stops_rows_and_masks_after_it(self, model, sampler, prompts):
        free = sampler.generate(*prompts, GREEDY, eos_token_id=None, pad_token_id=PAD)
        eos = int(free.tokens[0, 2])  # row 0 stops at step <= 2
        out = sampler.generate(*prompts, GREEDY, eos_token_id=eos, pad_token_id=PAD)
        expected = argmax_loop_without_cache(model, *prompts, N_NEW, eos=eos)
        np.testing.assert_array_equal(out.tokens, expected)
        np.testing.assert_array_equal(
            out.tokens, truncate_response(free.tokens, stop_token_id=eos, pad_token_id=PAD)
        )
        np.testing.assert_array_equal(out.mask, response_mask(free.tokens, stop_token_id=eos))
        np.testing.assert_array_equal(out.finished, (np.asarray(free.tokens) == eos).any(1))
        assert out.mask[0, 3:].sum() == 0 and out.finished[0]
        np.testing.assert_array_equal(np.asarray(out.logps)[out.mask == 0], 0.0)

    def test_all_rows_stop_at_step_zero(self, sampler, prompts):
        ids, mask = prompts
        same_ids, same_mask = np.repeat(ids[:1], len(ids), 0), np.repeat(mask[:1], len(ids), 0)
        first = sampler.generate(same_ids, same_mask, GREEDY, eos_token_id=None,
                                 pad_token_id=PAD).tokens[0, 0]
        out = sampler.generate(same_ids, same_mask, GREEDY, eos_token_id=int(first),
                               pad_token_id=PAD)
        np.testing.assert_array_equal(out.tokens[:, 0], first)
        np.testing.assert_array_equal(out.tokens[:, 1:], PAD)
        np.testing.assert_array_equal(out.mask, np.eye(1, N_NEW, dtype=np.int32).repeat(8, 0))
        assert np.all(out.finished)


class TestSampled:
    def test_output_layout(self, sampled, prompts):
        ids, mask = prompts
        b, n = len(LENGTHS), N_SAMPLES
        assert isinstance(sampled, GenerationOutput)
        assert sampled.tokens.shape == (b * n, N_NEW) and sampled.prompt_length == P
        assert sampled.sequences.shape == (b * n, P + N_NEW)
        # rows b * n .. b * n + n - 1 belong to prompt b
        np.testing.assert_array_equal(sampled.sequences[:, :P], np.repeat(ids, n, 0))
        np.testing.assert_array_equal(sampled.sequence_mask[:, :P], np.repeat(mask, n, 0))
        np.testing.assert_array_equal(sampled.sequences[:, P:], sampled.tokens)
        np.testing.assert_array_equal(sampled.sequence_mask[:, P:], sampled.mask)
        # the two samples of a prompt are different draws
        assert not np.array_equal(sampled.tokens[0::2], sampled.tokens[1::2])

    def test_logps_match_full_forward(self, model, sampled):
        logits = full_forward_logits(model, sampled.sequences, sampled.sequence_mask)
        step_logits = logits[:, P - 1 : P - 1 + N_NEW]  # logits that predicted each response token
        filtered = np.asarray(filter_logits(jnp.asarray(step_logits), **FILTERS), np.float64)
        tokens = np.asarray(sampled.tokens)[..., None]
        ref = np.take_along_axis(jax.nn.log_softmax(filtered, -1), tokens, -1)[..., 0]
        ref_model = np.take_along_axis(
            jax.nn.log_softmax(np.asarray(step_logits, np.float64), -1), tokens, -1
        )[..., 0]
        assert np.all(np.isfinite(ref))  # every sampled token survived the filters
        np.testing.assert_allclose(sampled.logps, ref, atol=1e-4)
        np.testing.assert_allclose(sampled.model_logps, ref_model, atol=1e-4)
        # temperature 0.8 sharpens the distribution: the two log-probs differ
        assert np.abs(np.asarray(sampled.logps) - ref_model).max() > 1e-2

    def test_same_key_same_output_other_key_differs(self, sampler, prompts, sampled):
        kw = dict(eos_token_id=None, pad_token_id=PAD, num_samples=N_SAMPLES)
        again = sampler.generate(*prompts, SAMPLING, rng=jax.random.key(7), **kw)
        other = sampler.generate(*prompts, SAMPLING, rng=jax.random.key(8), **kw)
        for a, b in zip(sampled, again):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(sampled.tokens, other.tokens)

    def test_eos_truncates_the_same_draws(self, sampler, prompts, sampled):
        # Step i always draws with fold_in(rng, i), so stopping at EOS changes nothing before it.
        eos = int(sampled.tokens[3, 1])
        out = sampler.generate(*prompts, SAMPLING, rng=jax.random.key(7), eos_token_id=eos,
                               pad_token_id=PAD, num_samples=N_SAMPLES)
        expected_mask = np.asarray(response_mask(sampled.tokens, stop_token_id=eos))
        np.testing.assert_array_equal(
            out.tokens, truncate_response(sampled.tokens, stop_token_id=eos, pad_token_id=PAD)
        )
        np.testing.assert_array_equal(out.mask, expected_mask)
        np.testing.assert_allclose(out.logps, np.asarray(sampled.logps) * expected_mask, atol=1e-6)
        np.testing.assert_allclose(
            out.model_logps, np.asarray(sampled.model_logps) * expected_mask, atol=1e-6
        )

    def test_state_api_and_sharded_batch_match(self, model, prompts, sampled):
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        graphdef, state = nnx.split(model)
        state = shard_state(state, mesh)
        out = generate_with_state(
            graphdef, state, *prompts, SAMPLING, rng=jax.random.key(7), eos_token_id=None,
            pad_token_id=PAD, mesh=mesh, num_samples=N_SAMPLES,
        )
        assert len(out.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(out.tokens, sampled.tokens)
        np.testing.assert_allclose(out.logps, sampled.logps, atol=1e-5)


class TestCacheSegments:
    """The cache grown in segments (shorter attention in early steps) changes nothing but the
    float rounding of the attention sums."""

    def test_segment_ends_and_default_count(self):
        assert segment_ends(128, 4) == (32, 64, 96, 128)
        assert segment_ends(7, 3) == (2, 5, 7)
        assert segment_ends(5, 1) == (5,)
        assert segment_ends(3, 3) == (1, 2, 3)
        assert [auto_cache_segments(n) for n in (1, 7, 63, 64, 100, 128, 4096)] == \
            [1, 1, 1, 2, 3, 4, 4]

    def test_grow_cache_appends_empty_slots(self, model):
        cache = model.init_cache(2, 5)
        cache = cache._replace(
            k=tuple(jnp.full_like(k, i + 1.0) for i, k in enumerate(cache.k)),
            v=tuple(jnp.full_like(v, -(i + 1.0)) for i, v in enumerate(cache.v)),
            index=jnp.int32(3),
        )
        grown = grow_cache(cache, 3)
        assert grown.max_length == 8 and int(grown.index) == 3
        for i, (k, v) in enumerate(zip(grown.k, grown.v)):
            assert k.shape == (2, cache.k[i].shape[1], 8, cache.k[i].shape[3])
            np.testing.assert_array_equal(k[:, :, :5], i + 1.0)
            np.testing.assert_array_equal(v[:, :, :5], -(i + 1.0))
            np.testing.assert_array_equal(k[:, :, 5:], 0.0)
            np.testing.assert_array_equal(v[:, :, 5:], 0.0)
        assert grow_cache(cache, 0) is cache

    def test_sampled_output_does_not_depend_on_segments(self, sampler, prompts, sampled):
        kw = dict(rng=jax.random.key(7), eos_token_id=None, pad_token_id=PAD,
                  num_samples=N_SAMPLES)
        for segments in (2, 3, N_NEW):
            out = sampler.generate(
                *prompts, dataclasses.replace(SAMPLING, cache_segments=segments), **kw)
            np.testing.assert_array_equal(out.tokens, sampled.tokens)
            np.testing.assert_array_equal(out.mask, sampled.mask)
            np.testing.assert_allclose(out.logps, sampled.logps, atol=1e-5)
            np.testing.assert_allclose(out.model_logps, sampled.model_logps, atol=1e-5)

    def test_greedy_one_slot_per_segment_matches_argmax_loop(self, model, prompts):
        out = generate(model, *prompts, dataclasses.replace(GREEDY, cache_segments=N_NEW),
                       eos_token_id=None, pad_token_id=PAD)
        np.testing.assert_array_equal(
            out.tokens, argmax_loop_without_cache(model, *prompts, N_NEW, eos=None)
        )

    def test_eos_across_segments(self, model, sampler, prompts):
        # Rows stop in different segments; once all have stopped the later loops run no step.
        free = sampler.generate(*prompts, GREEDY, eos_token_id=None, pad_token_id=PAD)
        one_segment = dataclasses.replace(GREEDY, cache_segments=1)
        three_segments = dataclasses.replace(GREEDY, cache_segments=3)
        for eos in (int(free.tokens[0, 2]), int(free.tokens[0, 0])):
            one = sampler.generate(*prompts, one_segment, eos_token_id=eos, pad_token_id=PAD)
            seg = sampler.generate(*prompts, three_segments, eos_token_id=eos, pad_token_id=PAD)
            np.testing.assert_array_equal(seg.tokens, one.tokens)
            np.testing.assert_array_equal(seg.mask, one.mask)
            np.testing.assert_array_equal(seg.finished, one.finished)
            np.testing.assert_array_equal(
                seg.tokens, argmax_loop_without_cache(model, *prompts, N_NEW, eos=eos)
            )
        # Every row stops at step 0: the loops of all three segments run no step.
        ids, mask = prompts
        same_ids, same_mask = np.repeat(ids[:1], len(ids), 0), np.repeat(mask[:1], len(ids), 0)
        first = int(free.tokens[0, 0])
        out = sampler.generate(same_ids, same_mask, three_segments, eos_token_id=first,
                               pad_token_id=PAD)
        np.testing.assert_array_equal(out.tokens[:, 0], first)
        np.testing.assert_array_equal(out.tokens[:, 1:], PAD)
        np.testing.assert_array_equal(out.mask.sum(1), 1)
        assert np.all(out.finished)

    def test_sharded_segments_match_one_device(self, model, prompts, sampled):
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        sharded = Sampler(model, mesh=mesh)
        out = sharded.generate(*prompts, dataclasses.replace(SAMPLING, cache_segments=3),
                               rng=jax.random.key(7), eos_token_id=None, pad_token_id=PAD,
                               num_samples=N_SAMPLES)
        assert len(out.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(out.tokens, sampled.tokens)
        np.testing.assert_allclose(out.logps, sampled.logps, atol=1e-5)

    @pytest.mark.parametrize("bad", [0, N_NEW + 1, True, 1.5, "2"])
    def test_bad_segment_count(self, sampler, prompts, bad):
        with pytest.raises(ValueError, match="cache_segments must be an int in"):
            sampler.generate(*prompts, dataclasses.replace(SAMPLING, cache_segments=bad),
                             rng=jax.random.key(0), eos_token_id=None, pad_token_id=PAD)


def test_num_samples_shares_the_program_of_repeated_prompts(sampler, prompts, sampled):
    """``num_samples=n`` over B prompts is sampling of the B * n repeated prompts: the same
    tokens, from the same compiled program (best-of-n and a rollout or evaluation of as many
    rows share it)."""
    ids, mask = (np.repeat(x, N_SAMPLES, axis=0) for x in prompts)
    with CompileCounter() as counter:
        out = sampler.generate(ids, mask, SAMPLING, rng=jax.random.key(7), eos_token_id=None,
                               pad_token_id=PAD)
    assert counter.compiles["jit(_generate_jit)"] == 0
    for name in ("sequences", "tokens", "logps", "mask"):
        np.testing.assert_array_equal(getattr(out, name), getattr(sampled, name), err_msg=name)


def test_first_token_frequencies_follow_filtered_softmax(model, prompts):
    ids, mask = prompts
    n = 4000
    kw = dict(temperature=1.3, top_k=12, top_p=0.9)
    out = generate(model, ids[:1], mask[:1], SamplingParams(max_new_tokens=1, **kw),
                   rng=jax.random.key(3), eos_token_id=None, pad_token_id=PAD, num_samples=n)
    logits = full_forward_logits(model, ids[:1], mask[:1])[0, -1]
    probs = np.asarray(jax.nn.softmax(np.asarray(filter_logits(jnp.asarray(logits), **kw),
                                                 np.float64)))
    freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=probs.size) / n
    # Binomial(n, p) / n per token, sd sqrt(p (1 - p) / n) <= 0.0079 for n = 4000. A 5-sigma band
    # per token is exceeded with probability < 6e-7, < 1e-5 over the <= 12 kept tokens (union
    # bound); tokens removed by top-k/top-p must never appear.
    sigma = np.sqrt(probs * (1 - probs) / n)
    np.testing.assert_array_less(np.abs(freq - probs), 5 * sigma + 1e-12)
    np.testing.assert_array_equal(freq[probs == 0], 0.0)
    assert out.tokens.shape == (n, 1) and np.all(out.mask == 1)


class TestBestOfN:
    def test_keeps_best_and_worst_under_a_token_reward(self, sampler, prompts, sampled):
        # Reward: number of even response tokens; reuses the compiled sampling configuration.
        def even_tokens(prompt_ids, response_ids, response_mask):
            return (np.asarray(response_ids) % 2 == 0).sum(1).astype(np.float32)

        seen = {}

        def recording(prompt_ids, response_ids, response_mask):
            seen.update(prompt_ids=prompt_ids, mask=response_mask)
            return even_tokens(prompt_ids, response_ids, response_mask)

        res = best_of_n(sampler, *prompts, SAMPLING, num_samples=2,
                        reward=TokenRewardFunction(recording), rng=jax.random.key(7),
                        eos_token_id=None, pad_token_id=PAD, return_worst=True)
        scores = even_tokens(None, sampled.tokens, None).reshape(-1, 2)
        np.testing.assert_array_equal(res.scores, scores)
        np.testing.assert_array_equal(seen["prompt_ids"], np.repeat(prompts[0], 2, axis=0))
        np.testing.assert_array_equal(seen["mask"], sampled.mask)
        np.testing.assert_array_equal(res.selection.best_indices,
                                      np.arange(8) * 2 + scores.argmax(1))
        np.testing.assert_array_equal(res.best.tokens,
                                      np.asarray(sampled.tokens)[res.selection.best_indices])
        np.testing.assert_array_equal(res.worst.tokens,
                                      np.asarray(sampled.tokens)[res.selection.worst_indices])
        np.testing.assert_array_equal(even_tokens(None, res.best.tokens, None), scores.max(1))
        np.testing.assert_array_equal(even_tokens(None, res.worst.tokens, None), scores.min(1))

    def test_on_the_mesh_selects_what_one_device_selects(self, model, sampler, prompts):
        """Sampler and reward model on the (2, 4) mesh (the samples global arrays, the kept
        rows gathered on the devices): the scores, selection and kept rows of one device."""
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        rm = RewardModel(ModelConfig.tiny_gpt2(vocab_size=64, hidden_size=32, num_layers=1,
                                               num_heads=2), rngs=nnx.Rngs(3))
        even = TokenRewardFunction(
            lambda p, r, m: ((np.asarray(r) % 2 == 0) & (np.asarray(m) > 0)).sum(1) / 8.0)
        kw = dict(num_samples=2, rng=jax.random.key(7), eos_token_id=1, pad_token_id=PAD,
                  return_worst=True, missing_eos_penalty=0.5)
        one = best_of_n(sampler, *prompts, SAMPLING, reward=WeightedRewardSum(
            [RewardModelSource(rm), even], [1.0, 0.5]), **kw)
        on_mesh = best_of_n(
            Sampler(shard_model(nnx.clone(model), mesh), mesh=mesh), *prompts, SAMPLING,
            reward=WeightedRewardSum([RewardModelSource(rm, mesh=mesh), even], [1.0, 0.5]), **kw)
        assert on_mesh.samples.sequences.sharding.mesh == mesh
        np.testing.assert_array_equal(gather_to_host(on_mesh.samples.sequences),
                                      one.samples.sequences)
        np.testing.assert_allclose(on_mesh.scores, one.scores, rtol=1e-5, atol=1e-6)
        for name in ("best_indices", "worst_indices"):
            np.testing.assert_array_equal(getattr(on_mesh.selection, name),
                                          getattr(one.selection, name))
        for kept in ("best", "worst"):
            np.testing.assert_array_equal(gather_to_host(getattr(on_mesh, kept).sequences),
                                          getattr(one, kept).sequences)

    def test_prompt_fields_and_missing_eos_penalty_reach_the_scores(self, sampler, prompts):
        class Flagged:
            """Scores 1 on flagged prompts, 0 elsewhere: reads a prompt field."""

            name = "flagged"

            def __call__(self, responses, fields):
                assert fields["flag"].shape == (16,)
                return jnp.asarray(fields["flag"], jnp.float32)

        flag = np.arange(8) % 2
        res = best_of_n(sampler, *prompts, SAMPLING, num_samples=2, reward=Flagged(),
                        rng=jax.random.key(7), eos_token_id=None, pad_token_id=PAD,
                        prompts={"flag": flag}, missing_eos_penalty=0.25)
        # eos_token_id=None: no sample finishes, every score loses the penalty.
        np.testing.assert_allclose(res.scores, np.repeat(flag, 2).reshape(8, 2) - 0.25)

    def test_rejects_bad_scores(self, sampler, prompts):
        kw = dict(rng=jax.random.key(0), eos_token_id=None, pad_token_id=PAD, num_samples=2)
        nan = TokenRewardFunction(lambda p, r, m: np.full(16, np.nan), name="nan")
        with pytest.raises(ValueError, match="'nan' returned non-finite"):
            best_of_n(sampler, *prompts, SAMPLING, reward=nan, **kw)

        class OnDevice:
            name = "device"

            def __call__(self, responses, fields):
                return jnp.full((16,), jnp.inf)

        with pytest.raises(ValueError, match="'device' returned non-finite"):
            best_of_n(sampler, *prompts, SAMPLING, reward=OnDevice(), **kw)
        short = TokenRewardFunction(lambda p, r, m: np.zeros(3), name="short")
        with pytest.raises(ValueError, match="'short' returned shape"):
            best_of_n(sampler, *prompts, SAMPLING, reward=short, **kw)
        zeros = TokenRewardFunction(lambda p, r, m: np.zeros(8))
        with pytest.raises(ValueError, match="num_samples >= 2"):
            best_of_n(sampler, *prompts, SAMPLING, reward=zeros, return_worst=True,
                      **{**kw, "num_samples": 1})


class TestInputValidation:
    KW = dict(rng=jax.random.key(0), eos_token_id=1, pad_token_id=PAD)
    SHORT = SamplingParams(max_new_tokens=2)

    def test_all_padding_prompt_rejected(self, sampler, prompts):
        ids, mask = prompts
        mask = mask.copy()
        mask[2] = 0
        with pytest.raises(ValueError, match=r"prompt_mask rows \[2\] are all padding"):
            sampler.generate(ids, mask, self.SHORT, **self.KW)

    def test_right_padded_prompt_rejected(self, sampler):
        with pytest.raises(ValueError, match="not left-padded"):
            sampler.generate(np.ones((1, 3), np.int32), np.array([[1, 1, 0]]), self.SHORT,
                             **self.KW)

    @pytest.mark.parametrize(
        "bad, match",
        [
            (dict(max_new_tokens=0), "max_new_tokens"),
            (dict(temperature=0.0), "temperature"),
            (dict(top_p=0.0), "top_p"),
            (dict(min_p=1.5), "min_p"),
            (dict(top_k=0), "top_k"),
            (dict(num_samples=0), "num_samples"),
            (dict(rng=None), "rng is required"),
        ],
    )
    def test_bad_arguments(self, sampler, prompts, bad, match):
        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        sampling = dataclasses.replace(self.SHORT, **{k: v for k, v in bad.items() if k in fields})
        kwargs = {**self.KW, **{k: v for k, v in bad.items() if k not in fields}}
        with pytest.raises(ValueError, match=match):
            sampler.generate(*prompts, sampling, **kwargs)

    def test_sampling_must_be_sampling_params(self, sampler, prompts):
        with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
            sampler.generate(*prompts, {"max_new_tokens": 2}, **self.KW)

    def test_shape_mismatch_and_mesh_divisibility(self, sampler, prompts):
        ids, mask = prompts
        with pytest.raises(ValueError, match="prompt_ids and prompt_mask"):
            sampler.generate(ids, mask[:, 1:], self.SHORT, **self.KW)
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        with pytest.raises(ValueError, match="not divisible"):
            sampler.generate(ids[:6], mask[:6], self.SHORT, mesh=mesh, **self.KW)
