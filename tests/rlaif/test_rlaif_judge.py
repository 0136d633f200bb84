"""Pairwise judge and direct scorer: exact arithmetic with a crafted LM, tiny CausalLM, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import char_score, sigmoid

from rlhf_jax.generation import GenerationOutput, SamplingParams, score_samples
from rlhf_jax.rlaif import (
    DirectScorer,
    Exemplar,
    PairwiseJudge,
    PairwiseTemplate,
    ScoreTemplate,
    TextModel,
)
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_model

WEIGHTS = {"c": 1.0, "d": -0.5, "e": 2.0, "f": 0.25, "g": -1.5}
PROMPTS = ["xyz>", "q>", "a longer prompt>", "k>", "mm>", "n>", "op>"]
RESP_1 = ["c", "cc", "d", "ee", "fg", "g", "cdef"]
RESP_2 = ["d", "c", "e", "ee", "g", "cg", "edcf"]


def _reference_pair(responses_1, responses_2, *, bias, vocab_size):
    """float64 forward/reverse/debiased preferences and answer mass for the crafted LM."""
    s1 = np.array([char_score(r, WEIGHTS) for r in responses_1])
    s2 = np.array([char_score(r, WEIGHTS) for r in responses_2])
    forward = sigmoid(s1 + bias - s2)
    reverse = sigmoid(s2 + bias - s1)
    vocab_rest = vocab_size - 2

    def mass(z1, z2):
        # Other logits are 0, except the 9 score tokens whose logits are 0 here as well.
        return (np.exp(z1) + np.exp(z2)) / (np.exp(z1) + np.exp(z2) + vocab_rest)

    return (
        forward,
        reverse,
        0.5 * (forward + 1.0 - reverse),
        np.stack([mass(s1 + bias, s2), mass(s2 + bias, s1)], axis=1),
    )


class TestPairwiseJudgeCrafted:
    @pytest.mark.parametrize("bias", [0.0, 1.3])
    def test_exact_debiased_soft_labels(self, tokenizer, make_crafted, judge_template, bias):
        model = make_crafted(WEIGHTS, slot_bias=bias)
        judge = PairwiseJudge(model, tokenizer, template=judge_template, batch_size=4)
        out = judge.judge(PROMPTS, RESP_1, RESP_2)
        forward, reverse, pref, mass = _reference_pair(
            RESP_1, RESP_2, bias=bias, vocab_size=model.vocab_size
        )
        np.testing.assert_allclose(out.forward, forward, atol=1e-6)
        np.testing.assert_allclose(out.reverse, reverse, atol=1e-6)
        np.testing.assert_allclose(out.preference, pref, atol=1e-6)
        np.testing.assert_allclose(out.position_bias, 0.5 * (forward + reverse) - 0.5, atol=1e-6)
        np.testing.assert_allclose(out.answer_mass, mass, rtol=1e-5)
        np.testing.assert_allclose(judge(PROMPTS, RESP_1, RESP_2), out.preference)
        assert out.rationales is None

    def test_position_bias_cancels(self, tokenizer, make_crafted, judge_template):
        # A first-slot bias changes each order's reading but the debiased label still favours the
        # better response, and swapping the responses gives exactly 1 - p.
        model = make_crafted(WEIGHTS, slot_bias=3.0)
        judge = PairwiseJudge(model, tokenizer, template=judge_template, batch_size=8)
        p = judge(PROMPTS, RESP_1, RESP_2)
        p_swapped = judge(PROMPTS, RESP_2, RESP_1)
        np.testing.assert_allclose(p + p_swapped, 1.0, atol=1e-6)
        s = np.array([char_score(a, WEIGHTS) - char_score(b, WEIGHTS) for a, b in zip(RESP_1, RESP_2)])
        np.testing.assert_array_equal(np.sign(p - 0.5), np.sign(s))
        # Without debiasing the first slot wins even when it is worse.
        assert np.all(judge.judge(PROMPTS, RESP_1, RESP_2).forward > 0.5)

    def test_few_shot_exemplars_and_principles(self, tokenizer, make_crafted, principle_template):
        # Exemplars carry the same markers; the judge reads only the sample at the end.
        template = PairwiseTemplate(
            preamble=principle_template.preamble,
            query=principle_template.query,
            answer_prompt="=",
            answer_tokens=("a", "b"),
            exemplars=(Exemplar("s>", "ggg", "eee", preferred=2),),
            separator=" ",
        )
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=template, batch_size=4)
        out = judge.judge(PROMPTS, RESP_1, RESP_2, principles="be kind")
        _, _, pref, _ = _reference_pair(RESP_1, RESP_2, bias=0.0, vocab_size=53)
        np.testing.assert_allclose(out.preference, pref, atol=1e-6)
        forward, _ = judge.prompts(PROMPTS[:1], RESP_1[:1], RESP_2[:1], principles="be kind")
        assert forward[0] == "be kind s><user>ggg<system>eee<assistant> =b xyz><user>c<system>d<assistant>"

    def test_mismatched_inputs(self, tokenizer, make_crafted, judge_template):
        judge = PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=judge_template)
        with pytest.raises(ValueError, match="differ in length"):
            judge.judge(PROMPTS, RESP_1[:2], RESP_2)
        with pytest.raises(ValueError, match="empty lists"):
            judge.judge([], [], [])
        with pytest.raises(ValueError, match="no \\{principle\\} placeholder"):
            judge.judge(PROMPTS, RESP_1, RESP_2, principles="p")
        with pytest.raises(ValueError, match="principles has 2 entries for 7"):
            PairwiseJudge(make_crafted(WEIGHTS), tokenizer).prompts(
                PROMPTS, RESP_1, RESP_2, principles=["a", "b"]
            )


class TestAnswerTokenValidation:
    @pytest.mark.parametrize(
        "tokens, message",
        [
            (("10", "2"), r"answer_tokens\[0\]: '10' is not a single token .*2 tokens"),
            (("1", "yes"), r"answer_tokens\[1\]: 'yes' is not a single token"),
            (("A", "B"), r"answer_tokens\[0\]: 'A' is not in the tokenizer's vocabulary"),
        ],
    )
    def test_not_single_tokens(self, tokenizer, make_crafted, tokens, message):
        template = PairwiseTemplate.default(answer_tokens=tokens)
        with pytest.raises(ValueError, match=message):
            PairwiseJudge(make_crafted(WEIGHTS), tokenizer, template=template)

    def test_score_tokens(self, tokenizer, make_crafted):
        with pytest.raises(ValueError, match=r"score_tokens\[9\]: '10' is not a single token"):
            DirectScorer(make_crafted(WEIGHTS), tokenizer, template=ScoreTemplate.default())


class TestDirectScorerCrafted:
    SLOPE = np.linspace(-1.0, 1.0, 9)
    OFFSET = np.array([0.3, -0.2, 0.0, 0.5, 0.1, -0.4, 0.2, 0.0, -0.1])

    def _reference(self, responses):
        s = np.array([char_score(r, WEIGHTS) for r in responses])[:, None]
        z = s * self.SLOPE[None] + self.OFFSET[None]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p @ np.arange(1, 10, dtype=np.float64), p

    def test_exact_expected_score(self, tokenizer, make_crafted, score_template):
        model = make_crafted(WEIGHTS, score_slope=self.SLOPE, score_offset=self.OFFSET)
        scorer = DirectScorer(model, tokenizer, template=score_template, batch_size=4)
        out = scorer.score(PROMPTS, RESP_1)
        expected, dist = self._reference(RESP_1)
        np.testing.assert_allclose(out.score, expected, atol=1e-5)
        np.testing.assert_allclose(out.distribution, dist, atol=1e-6)
        assert out.score.shape == (len(PROMPTS),) and np.all(out.score_mass < 1)

    def test_reward_function_on_text_and_tokens(self, tokenizer, make_crafted, score_template):
        model = make_crafted(WEIGHTS, score_slope=self.SLOPE, score_offset=self.OFFSET)
        scorer = DirectScorer(model, tokenizer, template=score_template, batch_size=4)
        expected, _ = self._reference(RESP_2)
        rewards = scorer(PROMPTS, RESP_2)
        assert isinstance(rewards, np.ndarray) and rewards.dtype == np.float32
        np.testing.assert_allclose(rewards, expected, atol=1e-5)
        # Token form: left-padded prompts, right-padded responses with EOS, as rollouts give.
        p_ids = [tokenizer.encode(p) for p in PROMPTS]
        r_ids = [tokenizer.encode(r) + [tokenizer.eos_token_id] for r in RESP_2]
        pw, rw = max(map(len, p_ids)), max(map(len, r_ids))
        prompt_ids = np.zeros((len(PROMPTS), pw), np.int32)
        prompt_mask = np.zeros_like(prompt_ids)
        response_ids = np.zeros((len(PROMPTS), rw), np.int32)
        response_mask = np.zeros_like(response_ids)
        for i, (p, r) in enumerate(zip(p_ids, r_ids)):
            prompt_ids[i, pw - len(p):] = p
            prompt_mask[i, pw - len(p):] = 1
            response_ids[i, : len(r)] = r
            response_mask[i, : len(r)] = 1
        np.testing.assert_allclose(
            scorer.token_reward(prompt_ids, response_ids, response_mask), expected, atol=1e-5
        )
        # As a reward source (the interface of best-of-n and the trainers), on a GenerationOutput.
        output = GenerationOutput(
            tokens=jnp.asarray(response_ids),
            mask=jnp.asarray(response_mask),
            logps=jnp.zeros(response_ids.shape),
            model_logps=jnp.zeros(response_ids.shape),
            sequences=jnp.asarray(np.concatenate([prompt_ids, response_ids], 1)),
            sequence_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
            finished=jnp.ones(len(PROMPTS), bool),
            prompt_length=pw,
        )
        source = scorer.reward_source()
        assert source.name == "judge"
        np.testing.assert_allclose(source(output, {}), expected, atol=1e-5)
        np.testing.assert_allclose(score_samples(source, output, {}), expected, atol=1e-5)
        policy_decode = scorer.reward_source(
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), name="d")
        np.testing.assert_allclose(policy_decode(output, {}), expected, atol=1e-5)


def _reference_logps(model, tokenizer, texts, ids):
    """Reference next-token log-probs: one causal forward over right-padded rows, no mask.

    Causal attention makes the logits at a row's last real token independent of the padding
    after it, so this is independent of the judge's left padding, masks and positions.
    """
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits = np.asarray(model(jnp.asarray(tokens)), np.float64)
    last = logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    last = last - last.max(axis=1, keepdims=True)
    logp = last - np.log(np.exp(last).sum(axis=1, keepdims=True))
    return logp[:, ids]


TINY_TEMPLATE = dict(
    preamble="which is better",
    query="q:{prompt} a:{response_1} b:{response_2}",
    answer_prompt=" best=",
    answer_tokens=("a", "b"),
    separator=" ",
)


class TestTinyCausalLM:
    def test_matches_unpadded_reference(self, tokenizer, tiny_lm):
        template = PairwiseTemplate(**TINY_TEMPLATE)
        judge = PairwiseJudge(tiny_lm, tokenizer, template=template, batch_size=4)
        out = judge.judge(PROMPTS, RESP_1, RESP_2)
        forward, reverse = judge.prompts(PROMPTS, RESP_1, RESP_2)
        texts = [template.render_answer(c) for c in forward + reverse]
        logp = _reference_logps(tiny_lm, tokenizer, texts, judge.answer_ids)
        n = len(PROMPTS)
        pf = sigmoid(logp[:n, 0] - logp[:n, 1])
        pr = sigmoid(logp[n:, 0] - logp[n:, 1])
        np.testing.assert_allclose(out.forward, pf, atol=2e-5)
        np.testing.assert_allclose(out.reverse, pr, atol=2e-5)
        np.testing.assert_allclose(out.preference, 0.5 * (pf + 1 - pr), atol=2e-5)
        np.testing.assert_allclose(out.answer_mass[:, 0], np.exp(logp[:n]).sum(1), rtol=1e-4)

    def test_chain_of_thought(self, tokenizer, tiny_lm):
        template = PairwiseTemplate(**TINY_TEMPLATE, cot_prompt="why:")
        judge = PairwiseJudge(
            tiny_lm, tokenizer, template=template, batch_size=4, min_bucket=64,
            rationale_tokens=4, rationale_temperature=1.0,
        )
        with pytest.raises(ValueError, match="rng is required"):
            judge.judge(PROMPTS[:2], RESP_1[:2], RESP_2[:2])
        out = judge.judge(PROMPTS[:2], RESP_1[:2], RESP_2[:2], rng=jax.random.key(1))
        again = judge.judge(PROMPTS[:2], RESP_1[:2], RESP_2[:2], rng=jax.random.key(1))
        assert out.rationales == again.rationales
        np.testing.assert_array_equal(out.preference, again.preference)
        forward, reverse = judge.prompts(PROMPTS[:2], RESP_1[:2], RESP_2[:2])
        rationales = out.rationales[0] + out.rationales[1]
        assert len(rationales) == 4 and all(isinstance(r, str) for r in rationales)
        # The answer is read after the generated rationale.
        texts = [template.render_answer(c, r) for c, r in zip(forward + reverse, rationales)]
        logp = _reference_logps(tiny_lm, tokenizer, texts, judge.answer_ids)
        np.testing.assert_allclose(out.forward, sigmoid(logp[:2, 0] - logp[:2, 1]), atol=2e-5)
        np.testing.assert_allclose(out.reverse, sigmoid(logp[2:, 0] - logp[2:, 1]), atol=2e-5)

    def test_over_long_prompt_names_the_pair(self, tokenizer, tiny_lm):
        judge = PairwiseJudge(tiny_lm, tokenizer, template=PairwiseTemplate(**TINY_TEMPLATE))
        with pytest.raises(
            ValueError, match=r"labeler prompt of pair 1 \(given order\) has \d+ tokens, more than "
            r"max_length=128"
        ):
            judge.judge(["p", "p"], ["a", "a" * 200], ["b", "b"])

    def test_sharded_model_on_data_mesh(self, tokenizer, tiny_config):
        from flax import nnx

        from rlhf_jax.models import CausalLM

        template = PairwiseTemplate(**TINY_TEMPLATE)
        reference = PairwiseJudge(
            CausalLM(tiny_config, rngs=nnx.Rngs(3)), tokenizer, template=template, batch_size=8
        ).judge(PROMPTS, RESP_1, RESP_2)
        mesh = make_mesh(MeshConfig(data=8))
        model = shard_model(CausalLM(tiny_config, rngs=nnx.Rngs(3)), mesh)
        judge = PairwiseJudge(model, tokenizer, template=template, batch_size=8, mesh=mesh)
        out = judge.judge(PROMPTS, RESP_1, RESP_2)
        np.testing.assert_allclose(out.preference, reference.preference, atol=1e-5)
        np.testing.assert_allclose(out.forward, reference.forward, atol=1e-5)
        with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
            PairwiseJudge(model, tokenizer, template=template, batch_size=4, mesh=mesh)


class TestTextModel:
    def test_from_state_and_generate(self, tokenizer, tiny_lm):
        from flax import nnx

        graphdef, state = nnx.split(tiny_lm)
        lm = TextModel.from_state(graphdef, state, tokenizer, batch_size=4, min_bucket=64)
        texts = ["ab>", "cde>", "f>"]
        argmax = SamplingParams(max_new_tokens=4, greedy=True)
        greedy = lm.generate(texts, argmax, stop_strings=("z",))
        assert len(greedy) == 3 and all(isinstance(t, str) and "z" not in t for t in greedy)
        assert greedy == lm.generate(texts, argmax, stop_strings=("z",))
        with pytest.raises(ValueError, match="rng is required"):
            lm.generate(texts, SamplingParams(max_new_tokens=4))
        logps = lm.next_token_logps(texts, [5, 6, 7])
        assert logps.shape == (3, 3) and np.all(logps < 0)
        reference = _reference_logps(tiny_lm, tokenizer, texts, [5, 6, 7])
        np.testing.assert_allclose(logps, reference, atol=2e-5)
