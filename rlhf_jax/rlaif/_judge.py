"""Pairwise AI judge: soft preference labels from a language model's answer-token probabilities.

Following Lee et al. (2023, "RLAIF vs. RLHF", sec. 2.1): the labeler prompt (preamble,
optional few-shot exemplars, the sample, optionally a generated chain-of-thought rationale) is
followed by an answer prompt; the preference is the probability of the answer token for
response 1, normalised over the two answer tokens. The prompt is built for both presentation
orders, and the two preferences are averaged (:func:`debias_position`) to cancel position bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.rlaif._preferences import answer_preference, debias_position, position_bias
from rlhf_jax.rlaif._templates import PairwiseTemplate
from rlhf_jax.rlaif._text_model import TextModel, TextModelLabeler, single_token_id


class JudgeOutput(NamedTuple):
    """Soft preferences of a pairwise judge.

    Attributes:
      preference: ``[N]`` float32 position-debiased P(response 1 better).
      forward: ``[N]`` P(first slot better) with the responses in the given order.
      reverse: ``[N]`` P(first slot better) with the responses swapped (so ``1 - reverse`` is
        P(response 1 better) read from the swapped prompt).
      position_bias: ``[N]`` ``(forward + reverse) / 2 - 1/2``; 0 for an order-consistent judge.
      answer_mass: ``[N, 2]`` total probability the model puts on the two answer tokens (out of the
        whole vocabulary), forward and reverse; small values mean the judge ignores the format.
      rationales: ``(forward, reverse)`` lists of generated rationales, or None without chain of
        thought.
    """

    preference: np.ndarray
    forward: np.ndarray
    reverse: np.ndarray
    position_bias: np.ndarray
    answer_mass: np.ndarray
    rationales: tuple[list[str], list[str]] | None


def broadcast_principles(
    principles: str | Sequence[str | None] | None, n: int, *, name: str = "principles"
) -> list[str | None]:
    """One principle (or None) per example from a single string, None, or a length-``n`` list."""
    if principles is None or isinstance(principles, str):
        return [principles] * n
    principles = list(principles)
    if len(principles) != n:
        raise ValueError(f"{name} has {len(principles)} entries for {n} examples")
    return principles


def check_texts(**named: Sequence[str]) -> int:
    """Checks that the named text lists are non-empty, have equal lengths and hold strings."""
    lengths = {k: len(v) for k, v in named.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the text lists differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"{', '.join(named)}: nothing to judge (empty lists)")
    for key, values in named.items():
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise TypeError(f"{key}[{i}] must be a string, got {type(v).__name__}")
    return n


class PairwiseJudge(TextModelLabeler):
    """Judges which of two responses to a prompt is better, as a soft label.

    Args:
      model: an NNX causal LM (split once) or None with :meth:`from_state`.
      tokenizer: its tokenizer; each of ``template.answer_tokens`` must be a single token.
      template: the labeler prompt.
      batch_size: rows per jitted forward; both presentation orders of all pairs are scored
        together, ``2N`` rows in ``ceil(2N / batch_size)`` calls.
      mesh: optional mesh the model's state is sharded on.
      max_length: longest labeler prompt in tokens (default: the model's context length).
      min_bucket: smallest padded prompt length (texts are padded to powers of two >= this;
        a larger value means fewer distinct shapes, so fewer compilations).
      rationale_tokens: tokens generated for a chain-of-thought rationale.
      rationale_temperature: sampling temperature of the rationale; 0 decodes greedily.

    Raises:
      ValueError: when an answer token is not a single token for the tokenizer.
    """

    def __init__(
        self,
        model: nnx.Module | None,
        tokenizer: Any,
        *,
        template: PairwiseTemplate | None = None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        max_length: int | None = None,
        min_bucket: int = 16,
        rationale_tokens: int = 64,
        rationale_temperature: float = 0.0,
        _text_model: TextModel | None = None,
    ):
        self.template = template or PairwiseTemplate.default()
        if not isinstance(self.template, PairwiseTemplate):
            raise TypeError(f"template must be a PairwiseTemplate, got {type(self.template).__name__}")
        ids = [
            single_token_id(tokenizer, t, field=f"PairwiseTemplate.answer_tokens[{i}]")
            for i, t in enumerate(self.template.answer_tokens)
        ]
        if ids[0] == ids[1]:
            raise ValueError(f"answer tokens {self.template.answer_tokens} map to the same id")
        self.answer_ids = np.asarray(ids, np.int32)
        self._init_text_model(model, tokenizer, batch_size=batch_size, mesh=mesh,
                              max_length=max_length, min_bucket=min_bucket,
                              rationale_tokens=rationale_tokens,
                              rationale_temperature=rationale_temperature,
                              text_model=_text_model)

    def prompts(
        self,
        prompts: Sequence[str],
        responses_1: Sequence[str],
        responses_2: Sequence[str],
        *,
        principles: str | Sequence[str | None] | None = None,
    ) -> tuple[list[str], list[str]]:
        """The labeler contexts (before CoT/answer prompt) for the given and the swapped order."""
        n = check_texts(prompts=prompts, responses_1=responses_1, responses_2=responses_2)
        principles = broadcast_principles(principles, n)
        render = self.template.render_context
        forward = [
            render(prompt=p, response_1=a, response_2=b, principle=c)
            for p, a, b, c in zip(prompts, responses_1, responses_2, principles)
        ]
        reverse = [
            render(prompt=p, response_1=b, response_2=a, principle=c)
            for p, a, b, c in zip(prompts, responses_1, responses_2, principles)
        ]
        return forward, reverse

    def judge(
        self,
        prompts: Sequence[str],
        responses_1: Sequence[str],
        responses_2: Sequence[str],
        *,
        principles: str | Sequence[str | None] | None = None,
        rng: jax.Array | None = None,
    ) -> JudgeOutput:
        """Soft labels P(response 1 better) for ``N`` pairs.

        Args:
          prompts: ``N`` prompts.
          responses_1: ``N`` first responses.
          responses_2: ``N`` second responses.
          principles: a principle (or rubric) for every pair, one per pair, or None; needs a
            template with ``{principle}``.
          rng: PRNG key for sampled rationales (unused without chain of thought or with
            ``rationale_temperature=0``).

        Returns:
          A :class:`JudgeOutput`.
        """
        forward, reverse = self.prompts(prompts, responses_1, responses_2, principles=principles)
        n = len(forward)
        contexts = forward + reverse
        names = [f"labeler prompt of pair {i} ({order} order)" for order in ("given", "swapped")
                 for i in range(n)]
        rationales = None
        if self.template.cot_prompt is not None:
            if not self.rationale_sampling.greedy and rng is None:
                raise ValueError("rng is required to sample rationales (rationale_temperature > 0)")
            generated = self.lm.generate(
                [self.template.render_cot(c) for c in contexts],
                self.rationale_sampling,
                rng=rng,
                stop_strings=(self.template.answer_prompt,),
                names=names,
            )
            rationales = (generated[:n], generated[n:])
            texts = [self.template.render_answer(c, r) for c, r in zip(contexts, generated)]
        else:
            texts = [self.template.render_answer(c) for c in contexts]
        logps = self.lm.next_token_logps(texts, self.answer_ids, names=names)  # [2N, 2]
        prob_first = np.asarray(answer_preference(jnp.asarray(logps), jnp.arange(2)))
        pf, pr = prob_first[:n], prob_first[n:]
        mass = np.exp(logps.astype(np.float64)).sum(axis=1).astype(np.float32)
        return JudgeOutput(
            preference=np.asarray(debias_position(jnp.asarray(pf), jnp.asarray(pr))),
            forward=pf,
            reverse=pr,
            position_bias=np.asarray(position_bias(jnp.asarray(pf), jnp.asarray(pr))),
            answer_mass=np.stack([mass[:n], mass[n:]], axis=1),
            rationales=rationales,
        )

    def __call__(self, prompts, responses_1, responses_2, **kwargs) -> np.ndarray:
        """``judge(...).preference``: ``[N]`` P(response 1 better)."""
        return self.judge(prompts, responses_1, responses_2, **kwargs).preference
