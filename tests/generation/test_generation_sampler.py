"""The prefill + decode sampler against full forwards of the real CausalLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.generation import (
    GenerationOutput,
    Sampler,
    best_of_n,
    filter_logits,
    generate,
    generate_with_state,
    response_mask,
    reward_model_reward,
    text_reward,
    truncate_response,
)
from rlhf_jax.generation._sampler import auto_cache_segments, grow_cache, segment_ends
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_state

PAD = 0
N_NEW = 7
# Left-padded prompts of real lengths 6, 3, 1, 4, 6, 2, 5, 3 (token ids >= 1).
LENGTHS = (6, 3, 1, 4, 6, 2, 5, 3)
P = 6
SAMPLE_KW = dict(temperature=0.8, top_k=20, top_p=0.95, min_p=0.01, num_samples=2)


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
        *prompts, max_new_tokens=N_NEW, rng=jax.random.key(7), eos_token_id=None,
        pad_token_id=PAD, **SAMPLE_KW,
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


class TestGreedy:
    def test_matches_argmax_loop_without_cache(self, model, prompts):
        out = generate(model, *prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=None,
                       pad_token_id=PAD)
        expected = argmax_loop_without_cache(model, *prompts, N_NEW, eos=None)
        np.testing.assert_array_equal(out.tokens, expected)
        np.testing.assert_array_equal(out.mask, np.ones_like(expected))

    def test_rope_gqa_model_matches_argmax_loop(self, prompts):
        # Llama layout: RoPE positions from the left-padded mask, 4 query heads over 2 KV heads.
        config = ModelConfig.tiny_llama(vocab_size=64, hidden_size=32, num_heads=4,
                                        num_kv_heads=2, intermediate_size=64)
        llama = CausalLM(config, rngs=nnx.Rngs(1))
        out = generate(llama, *prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=None,
                       pad_token_id=PAD)
        np.testing.assert_array_equal(
            out.tokens, argmax_loop_without_cache(llama, *prompts, N_NEW, eos=None)
        )

    def test_eos_stops_rows_and_masks_after_it(self, model, sampler, prompts):
        free = sampler.generate(*prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=None,
                                pad_token_id=PAD)
        eos = int(free.tokens[0, 2])  # row 0 stops at step <= 2
        out = sampler.generate(*prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=eos,
                               pad_token_id=PAD)
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
        first = sampler.generate(same_ids, same_mask, max_new_tokens=N_NEW, greedy=True,
                                 eos_token_id=None, pad_token_id=PAD).tokens[0, 0]
        out = sampler.generate(same_ids, same_mask, max_new_tokens=N_NEW, greedy=True,
                               eos_token_id=int(first), pad_token_id=PAD)
        np.testing.assert_array_equal(out.tokens[:, 0], first)
        np.testing.assert_array_equal(out.tokens[:, 1:], PAD)
        np.testing.assert_array_equal(out.mask, np.eye(1, N_NEW, dtype=np.int32).repeat(8, 0))
        assert np.all(out.finished)


class TestSampled:
    def test_output_layout(self, sampled, prompts):
        ids, mask = prompts
        b, n = len(LENGTHS), SAMPLE_KW["num_samples"]
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
        kw = {k: v for k, v in SAMPLE_KW.items() if k != "num_samples"}
        filtered = np.asarray(filter_logits(jnp.asarray(step_logits), **kw), np.float64)
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
        kw = dict(max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=PAD, **SAMPLE_KW)
        again = sampler.generate(*prompts, rng=jax.random.key(7), **kw)
        other = sampler.generate(*prompts, rng=jax.random.key(8), **kw)
        for a, b in zip(sampled, again):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(sampled.tokens, other.tokens)

    def test_eos_truncates_the_same_draws(self, sampler, prompts, sampled):
        # Step i always draws with fold_in(rng, i), so stopping at EOS changes nothing before it.
        eos = int(sampled.tokens[3, 1])
        kw = dict(max_new_tokens=N_NEW, pad_token_id=PAD, **SAMPLE_KW)
        out = sampler.generate(*prompts, rng=jax.random.key(7), eos_token_id=eos, **kw)
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
            graphdef, state, *prompts, max_new_tokens=N_NEW, rng=jax.random.key(7),
            eos_token_id=None, pad_token_id=PAD, mesh=mesh, **SAMPLE_KW,
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
        kw = dict(max_new_tokens=N_NEW, rng=jax.random.key(7), eos_token_id=None,
                  pad_token_id=PAD, **SAMPLE_KW)
        for segments in (2, 3, N_NEW):
            out = sampler.generate(*prompts, cache_segments=segments, **kw)
            np.testing.assert_array_equal(out.tokens, sampled.tokens)
            np.testing.assert_array_equal(out.mask, sampled.mask)
            np.testing.assert_allclose(out.logps, sampled.logps, atol=1e-5)
            np.testing.assert_allclose(out.model_logps, sampled.model_logps, atol=1e-5)

    def test_greedy_one_slot_per_segment_matches_argmax_loop(self, model, prompts):
        out = generate(model, *prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=None,
                       pad_token_id=PAD, cache_segments=N_NEW)
        np.testing.assert_array_equal(
            out.tokens, argmax_loop_without_cache(model, *prompts, N_NEW, eos=None)
        )

    def test_eos_across_segments(self, model, sampler, prompts):
        # Rows stop in different segments; once all have stopped the later loops run no step.
        free = sampler.generate(*prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=None,
                                pad_token_id=PAD)
        for eos in (int(free.tokens[0, 2]), int(free.tokens[0, 0])):
            one = sampler.generate(*prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=eos,
                                   pad_token_id=PAD, cache_segments=1)
            seg = sampler.generate(*prompts, max_new_tokens=N_NEW, greedy=True, eos_token_id=eos,
                                   pad_token_id=PAD, cache_segments=3)
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
        out = sampler.generate(same_ids, same_mask, max_new_tokens=N_NEW, greedy=True,
                               eos_token_id=first, pad_token_id=PAD, cache_segments=3)
        np.testing.assert_array_equal(out.tokens[:, 0], first)
        np.testing.assert_array_equal(out.tokens[:, 1:], PAD)
        np.testing.assert_array_equal(out.mask.sum(1), 1)
        assert np.all(out.finished)

    def test_sharded_segments_match_one_device(self, model, prompts, sampled):
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        sharded = Sampler(model, mesh=mesh)
        out = sharded.generate(*prompts, max_new_tokens=N_NEW, rng=jax.random.key(7),
                               eos_token_id=None, pad_token_id=PAD, cache_segments=3,
                               **SAMPLE_KW)
        assert len(out.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(out.tokens, sampled.tokens)
        np.testing.assert_allclose(out.logps, sampled.logps, atol=1e-5)

    @pytest.mark.parametrize("bad", [0, N_NEW + 1, True, 1.5, "2"])
    def test_bad_segment_count(self, sampler, prompts, bad):
        with pytest.raises(ValueError, match="cache_segments must be an int in"):
            sampler.generate(*prompts, max_new_tokens=N_NEW, rng=jax.random.key(0),
                             eos_token_id=None, pad_token_id=PAD, cache_segments=bad)


def test_first_token_frequencies_follow_filtered_softmax(model, prompts):
    ids, mask = prompts
    n = 4000
    kw = dict(temperature=1.3, top_k=12, top_p=0.9)
    out = generate(model, ids[:1], mask[:1], max_new_tokens=1, rng=jax.random.key(3),
                   eos_token_id=None, pad_token_id=PAD, num_samples=n, **kw)
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
        def reward_fn(output):
            return (np.asarray(output.tokens) % 2 == 0).sum(1).astype(np.float32)

        res = best_of_n(sampler, *prompts, num_samples=2, reward_fn=reward_fn,
                        rng=jax.random.key(7), max_new_tokens=N_NEW, eos_token_id=None,
                        pad_token_id=PAD, return_worst=True,
                        **{k: v for k, v in SAMPLE_KW.items() if k != "num_samples"})
        scores = reward_fn(sampled).reshape(-1, 2)
        np.testing.assert_array_equal(res.scores, scores)
        np.testing.assert_array_equal(res.selection.best_indices,
                                      np.arange(8) * 2 + scores.argmax(1))
        np.testing.assert_array_equal(res.best.tokens,
                                      np.asarray(sampled.tokens)[res.selection.best_indices])
        np.testing.assert_array_equal(res.worst.tokens,
                                      np.asarray(sampled.tokens)[res.selection.worst_indices])
        np.testing.assert_array_equal(reward_fn(res.best), scores.max(1))
        np.testing.assert_array_equal(reward_fn(res.worst), scores.min(1))

    def test_text_and_reward_model_wrappers(self, sampled):
        decode = lambda ids: " ".join(map(str, ids))
        seen = {}

        def on_text(prompts, responses):
            seen["p"], seen["r"] = prompts, responses
            return [len(r) for r in responses]

        scores = text_reward(on_text, decode=decode)(sampled)
        row = 0
        assert seen["p"][row] == decode(np.asarray(sampled.sequences)[row, P - LENGTHS[0] : P])
        assert seen["r"][row] == decode(np.asarray(sampled.tokens)[row])
        assert scores.shape == (16,)

        def fake_rm(ids, attention_mask, positions):
            # score = position of the last real token, as a [B, 1] head
            return jnp.max(positions * attention_mask, axis=1, keepdims=True).astype(jnp.float32)

        rm_scores = reward_model_reward(fake_rm)(sampled)
        np.testing.assert_array_equal(
            rm_scores, np.asarray(sampled.sequence_mask).sum(1) - 1
        )

    def test_rejects_bad_scores(self, sampler, prompts):
        kw = dict(rng=jax.random.key(0), max_new_tokens=N_NEW, eos_token_id=None,
                  pad_token_id=PAD, **SAMPLE_KW)
        with pytest.raises(ValueError, match="non-finite"):
            best_of_n(sampler, *prompts, reward_fn=lambda o: np.full(16, np.nan), **kw)
        with pytest.raises(ValueError, match="shape"):
            best_of_n(sampler, *prompts, reward_fn=lambda o: np.zeros(3), **kw)
        with pytest.raises(ValueError, match="num_samples >= 2"):
            best_of_n(sampler, *prompts, reward_fn=lambda o: np.zeros(8), return_worst=True,
                      **{**kw, "num_samples": 1})


class TestInputValidation:
    KW = dict(max_new_tokens=2, rng=jax.random.key(0), eos_token_id=1, pad_token_id=PAD)

    def test_all_padding_prompt_rejected(self, sampler, prompts):
        ids, mask = prompts
        mask = mask.copy()
        mask[2] = 0
        with pytest.raises(ValueError, match=r"prompt_mask rows \[2\] are all padding"):
            sampler.generate(ids, mask, **self.KW)

    def test_right_padded_prompt_rejected(self, sampler):
        with pytest.raises(ValueError, match="not left-padded"):
            sampler.generate(np.ones((1, 3), np.int32), np.array([[1, 1, 0]]), **self.KW)

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
        with pytest.raises(ValueError, match=match):
            sampler.generate(*prompts, **{**self.KW, **bad})

    def test_shape_mismatch_and_mesh_divisibility(self, sampler, prompts):
        ids, mask = prompts
        with pytest.raises(ValueError, match="prompt_ids and prompt_mask"):
            sampler.generate(ids, mask[:, 1:], **self.KW)
        mesh = make_mesh(MeshConfig(data=2, fsdp=4))
        with pytest.raises(ValueError, match="not divisible"):
            sampler.generate(ids[:6], mask[:6], mesh=mesh, **self.KW)
