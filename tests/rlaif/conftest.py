"""Shared fixtures: the local character tokenizer, a tiny CausalLM and a crafted stand-in LM.

The crafted LM is a deterministic ``nnx.Module`` with the ``CausalLM`` call signature whose
next-token logits at the last position are set by the test through its parameters:

- segment 1 is the tokens after the last ``<user>`` marker and before the next ``<system>``;
  segment 2 the tokens after the last ``<system>`` and before the next ``<assistant>``;
- ``s_j = sum_{t in segment j} weights[input_ids[t]]``;
- ``logits[:, -1, answer_ids[0]] = s_1 + slot_bias``, ``logits[:, -1, answer_ids[1]] = s_2``,
  ``logits[:, -1, score_ids[k]] = s_1 * score_slope[k] + score_offset[k]``; all others 0.

So with the judge template ``{prompt}<user>{response_1}<system>{response_2}<assistant>=`` the
answer logits are ``(s(response_1) + slot_bias, s(response_2))`` in the shown order, and tests
compute the exact expected preferences and scores in float64 NumPy from character counts.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.rlaif import PairwiseTemplate, ScoreTemplate

MARKERS = ("<user>", "<system>", "<assistant>")


class CraftedLM(nnx.Module):
    def __init__(
        self,
        *,
        vocab_size,
        markers,
        answer_ids,
        score_ids,
        weights,
        slot_bias=0.0,
        score_slope=None,
        score_offset=None,
    ):
        k = len(score_ids)
        self.vocab_size = int(vocab_size)
        self.markers = tuple(int(m) for m in markers)
        self.answer_ids = tuple(int(a) for a in answer_ids)
        self.score_ids = tuple(int(s) for s in score_ids)
        self.weights = nnx.Param(jnp.asarray(weights, jnp.float32))
        self.slot_bias = nnx.Param(jnp.asarray(slot_bias, jnp.float32))
        slope = np.zeros(k) if score_slope is None else score_slope
        offset = np.zeros(k) if score_offset is None else score_offset
        self.score_slope = nnx.Param(jnp.asarray(slope, jnp.float32))
        self.score_offset = nnx.Param(jnp.asarray(offset, jnp.float32))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)

        def after_last(marker):
            hits = (input_ids == marker) & mask
            count = jnp.cumsum(hits, axis=1)
            total = count[:, -1:]
            return (count == total) & (total > 0) & ~hits

        m1, m2, m3 = self.markers
        not_marker = (input_ids != m1) & (input_ids != m2) & (input_ids != m3)
        seg1 = after_last(m1) & ~after_last(m2) & not_marker & mask
        seg2 = after_last(m2) & ~after_last(m3) & not_marker & mask
        w = self.weights[...][input_ids]
        s1 = jnp.sum(jnp.where(seg1, w, 0.0), axis=1)
        s2 = jnp.sum(jnp.where(seg2, w, 0.0), axis=1)
        last = jnp.zeros((b, self.vocab_size), jnp.float32)
        last = last.at[:, self.answer_ids[0]].set(s1 + self.slot_bias[...])
        last = last.at[:, self.answer_ids[1]].set(s2)
        score = s1[:, None] * self.score_slope[...][None] + self.score_offset[...][None]
        last = last.at[:, jnp.asarray(self.score_ids)].set(score)
        return jnp.zeros((b, t, self.vocab_size), jnp.float32).at[:, -1].set(last)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def vocab(tokenizer):
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.get_vocab()}


@pytest.fixture(scope="session")
def judge_template():
    return PairwiseTemplate(
        preamble="",
        query="{prompt}<user>{response_1}<system>{response_2}<assistant>",
        answer_prompt="=",
        answer_tokens=("a", "b"),
        separator="",
    )


@pytest.fixture(scope="session")
def principle_template():
    return PairwiseTemplate(
        preamble="{principle}",
        query="{prompt}<user>{response_1}<system>{response_2}<assistant>",
        answer_prompt="=",
        answer_tokens=("a", "b"),
        separator="",
    )


@pytest.fixture(scope="session")
def score_template():
    return ScoreTemplate(
        preamble="",
        query="{prompt}<user>{response}<system>",
        answer_prompt="=",
        score_tokens=tuple("123456789"),
        separator="",
    )


@pytest.fixture(scope="session")
def make_crafted(tokenizer, vocab):
    """Builds a CraftedLM from ``{char: weight}`` and the other knobs."""

    def build(char_weights, *, slot_bias=0.0, score_slope=None, score_offset=None):
        weights = np.zeros(len(vocab), np.float32)
        for ch, w in char_weights.items():
            weights[vocab[ch]] = w
        return CraftedLM(
            vocab_size=len(vocab),
            markers=[vocab[m] for m in MARKERS],
            answer_ids=[vocab["a"], vocab["b"]],
            score_ids=[vocab[c] for c in "123456789"],
            weights=weights,
            slot_bias=slot_bias,
            score_slope=score_slope,
            score_offset=score_offset,
        )

    return build


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return ModelConfig.tiny_gpt2(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="session")
def tiny_lm(tiny_config):
    return CausalLM(tiny_config, rngs=nnx.Rngs(0))


def char_score(text, char_weights):
    """``s`` of a response: the sum of its characters' weights (float64)."""
    return float(sum(char_weights.get(c, 0.0) for c in text))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
