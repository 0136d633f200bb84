"""Models for the `rlhf-jax label` / `rlhf-jax cai` tests: tiny Hugging Face directories with
the synthetic character tokenizer, and a crafted judge whose preferences are known exactly.

The crafted judge is an ``nnx.Module`` with the ``CausalLM`` call signature. With the compact
template ``{prompt}<user>{response_1}<system>{response_2}<assistant>=`` and answers ``a``/``b``,
the logits at the last position are ``s(first shown response) + slot_bias`` for ``a`` and
``s(second shown response)`` for ``b`` (every other token 0), where ``s`` sums per-character
weights, so P(first slot) = sigmoid(s_1 + slot_bias - s_2).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.data.synthetic import build_tokenizer
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.hf import save_pretrained
from rlhf_jax.rlaif import PairwiseTemplate

QUERY = "{prompt}<user>{response_1}<system>{response_2}<assistant>"
TEMPLATE_ARGS = ["--judge.template.preamble", "", "--judge.template.query", QUERY,
                 "--judge.template.answer-prompt", "=", "--judge.template.answer-tokens", "a", "b",
                 "--judge.template.separator", ""]


def compact_template(**overrides) -> PairwiseTemplate:
    fields = dict(preamble="", query=QUERY, answer_prompt="=", answer_tokens=("a", "b"),
                  separator="")
    fields.update(overrides)
    return PairwiseTemplate(**fields)


def write_tiny_hf(path, *, seed: int, num_layers: int = 1, max_positions: int = 256) -> str:
    """A randomly initialised tiny GPT-2 with the synthetic tokenizer, as an HF directory."""
    tok = build_tokenizer()
    config = ModelConfig.tiny_gpt2(vocab_size=64, hidden_size=32, num_layers=num_layers,
                                   num_heads=2, max_position_embeddings=max_positions,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(seed)), path, tokenizer=tok)
    return str(path)


class CraftedJudgeLM(nnx.Module):
    """See the module docstring."""

    def __init__(self, char_weights: dict[str, float], *, slot_bias: float = 0.0,
                 max_positions: int = 256):
        tok = build_tokenizer()
        vocab = tok.get_vocab()
        weights = np.zeros(len(vocab), np.float32)
        for ch, w in char_weights.items():
            weights[vocab[ch]] = w
        self.config = ModelConfig.tiny_gpt2(vocab_size=64, max_position_embeddings=max_positions)
        self.markers = tuple(vocab[m] for m in ("<user>", "<system>", "<assistant>"))
        self.answer_ids = (vocab["a"], vocab["b"])
        self.weights = nnx.Param(jnp.asarray(np.pad(weights, (0, 64 - len(weights)))))
        self.slot_bias = nnx.Param(jnp.asarray(slot_bias, jnp.float32))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)

        def after_last(marker):
            hits = (input_ids == marker) & mask
            count = jnp.cumsum(hits, axis=1)
            return (count == count[:, -1:]) & (count[:, -1:] > 0) & ~hits

        m1, m2, m3 = self.markers
        plain = (input_ids != m1) & (input_ids != m2) & (input_ids != m3) & mask
        w = self.weights[...][input_ids]
        s1 = jnp.sum(jnp.where(after_last(m1) & ~after_last(m2) & plain, w, 0.0), axis=1)
        s2 = jnp.sum(jnp.where(after_last(m2) & ~after_last(m3) & plain, w, 0.0), axis=1)
        last = jnp.zeros((b, 64), jnp.float32)
        last = last.at[:, self.answer_ids[0]].set(s1 + self.slot_bias[...])
        last = last.at[:, self.answer_ids[1]].set(s2)
        return jnp.zeros((b, t, 64), jnp.float32).at[:, -1].set(last)


def char_score(text: str, char_weights: dict[str, float]) -> float:
    return float(sum(char_weights.get(c, 0.0) for c in text))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
