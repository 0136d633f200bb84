"""Direct AI scorer: a 1-10 rating as the expected score over the score tokens ("d-RLAIF").

Lee et al. (2023, sec. 2.2, 4.2) prompt the labeler for a 1-10 rating and use the expectation of
the score under the model's (normalised) distribution over the score tokens directly as the
reward in RL, skipping the reward model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.generation import TextRewardFunction
from rlhf_jax.rlaif._judge import broadcast_principles, check_texts
from rlhf_jax.rlaif._preferences import expected_score, score_distribution
from rlhf_jax.rlaif._templates import ScoreTemplate
from rlhf_jax.rlaif._text_model import TextModel, TextModelLabeler, single_token_id
from rlhf_jax.rlaif._text_model import decode as decode_ids


class ScoreOutput(NamedTuple):
    """Direct scores.

    Attributes:
      score: ``[N]`` float32 expected score ``sum_k v_k p_k``.
      distribution: ``[N, K]`` the normalised score-token probabilities ``p_k``.
      score_mass: ``[N]`` probability the model puts on the score tokens out of the whole
        vocabulary.
      rationales: generated rationales, or None without chain of thought.
    """

    score: np.ndarray
    distribution: np.ndarray
    score_mass: np.ndarray
    rationales: list[str] | None


class DirectScorer(TextModelLabeler):
    """Rates single responses; also a reward function for PPO/GRPO.

    As a reward: :meth:`reward_source` is a ``rlhf_jax.generation.RewardSource`` (best-of-n,
    rejection sampling, PPO/GRPO/RLOO); ``scorer(prompts, responses) -> np.ndarray [B]`` scores
    text directly, and :meth:`token_reward` ``(prompt_ids [B, P], response_ids [B, N],
    response_mask [B, N]) -> [B]`` tokens.

    Args:
      model: an NNX causal LM (split once) or None with :meth:`from_state`.
      tokenizer: its tokenizer; every score token must be a single token.
      template: the labeler prompt.
      batch_size: rows per jitted forward.
      mesh: optional mesh the model's state is sharded on.
      max_length: longest labeler prompt in tokens.
      min_bucket: smallest padded prompt length (texts are padded to powers of two >= this;
        a larger value means fewer distinct shapes, so fewer compilations).
      rationale_tokens: tokens generated for a chain-of-thought rationale.
      rationale_temperature: rationale sampling temperature; 0 decodes greedily.
      principle: default principle for templates with ``{principle}``.

    Raises:
      ValueError: naming the score token that is not a single token.
    """

    def __init__(
        self,
        model: nnx.Module | None,
        tokenizer: Any,
        *,
        template: ScoreTemplate | None = None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        max_length: int | None = None,
        min_bucket: int = 16,
        rationale_tokens: int = 64,
        rationale_temperature: float = 0.0,
        principle: str | None = None,
        _text_model: TextModel | None = None,
    ):
        self.template = template or ScoreTemplate.default()
        if not isinstance(self.template, ScoreTemplate):
            raise TypeError(f"template must be a ScoreTemplate, got {type(self.template).__name__}")
        ids = [
            single_token_id(tokenizer, t, field=f"ScoreTemplate.score_tokens[{i}]")
            for i, t in enumerate(self.template.score_tokens)
        ]
        if len(set(ids)) != len(ids):
            raise ValueError(f"score tokens {self.template.score_tokens} map to repeated ids {ids}")
        self.score_ids = np.asarray(ids, np.int32)
        self.score_values = np.asarray(self.template.score_values, np.float32)
        self.principle = principle
        self.tokenizer = tokenizer
        self._init_text_model(model, tokenizer, batch_size=batch_size, mesh=mesh,
                              max_length=max_length, min_bucket=min_bucket,
                              rationale_tokens=rationale_tokens,
                              rationale_temperature=rationale_temperature,
                              text_model=_text_model)

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        principles: str | Sequence[str | None] | None = None,
        rng: jax.Array | None = None,
    ) -> ScoreOutput:
        """Expected scores of ``N`` responses.

        Args:
          prompts: ``N`` prompts.
          responses: ``N`` responses.
          principles: overrides the default principle (one, or one per example).
          rng: PRNG key for sampled rationales.

        Returns:
          A :class:`ScoreOutput`.
        """
        n = check_texts(prompts=prompts, responses=responses)
        principles = broadcast_principles(
            self.principle if principles is None else principles, n
        )
        contexts = [
            self.template.render_context(prompt=p, response=r, principle=c)
            for p, r, c in zip(prompts, responses, principles)
        ]
        names = [f"labeler prompt of example {i}" for i in range(n)]
        rationales = None
        if self.template.cot_prompt is not None:
            if not self.rationale_sampling.greedy and rng is None:
                raise ValueError("rng is required to sample rationales (rationale_temperature > 0)")
            rationales = self.lm.generate(
                [self.template.render_cot(c) for c in contexts],
                self.rationale_sampling,
                rng=rng,
                stop_strings=(self.template.answer_prompt,),
                names=names,
            )
            texts = [self.template.render_answer(c, r) for c, r in zip(contexts, rationales)]
        else:
            texts = [self.template.render_answer(c) for c in contexts]
        logps = jnp.asarray(self.lm.next_token_logps(texts, self.score_ids, names=names))  # [N, K]
        k = jnp.arange(len(self.score_ids))
        return ScoreOutput(
            score=np.asarray(expected_score(logps, k, jnp.asarray(self.score_values))),
            distribution=np.asarray(score_distribution(logps, k)),
            score_mass=np.exp(np.asarray(logps, np.float64)).sum(axis=1).astype(np.float32),
            rationales=rationales,
        )

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Reward on text: ``[B]`` float32 expected scores."""
        return self.score(list(prompts), list(responses)).score

    def reward_source(
        self, *, decode: Callable[[Sequence[int]], str] | None = None, name: str = "judge"
    ) -> TextRewardFunction:
        """This scorer as a reward source (``rlhf_jax.generation.RewardSource``, the interface of
        best-of-n, rejection sampling and the online trainers): the sampled prompt and response
        tokens are decoded, then scored (``d-RLAIF``, Lee et al. 2023).

        Args:
          decode: ids -> text for the policy's tokenizer (default: this scorer's tokenizer,
            skipping special tokens).
          name: the source's name.
        """
        return TextRewardFunction(
            self, decode=decode or functools.partial(decode_ids, self.tokenizer), name=name
        )

    def token_reward(
        self,
        prompt_ids: Any,
        response_ids: Any,
        response_mask: Any,
        *,
        prompt_mask: Any | None = None,
        decode_fn: Any | None = None,
    ) -> np.ndarray:
        """Reward on tokens: decodes the policy's tokens, then scores the text.

        Args:
          prompt_ids: ``[B, P]`` left-padded prompt ids.
          response_ids: ``[B, N]`` right-padded response ids.
          response_mask: ``[B, N]`` 1 on real response tokens.
          prompt_mask: ``[B, P]`` 1 on real prompt tokens; default: tokens other than the pad id.
          decode_fn: ids -> text for the policy's tokenizer (default: this scorer's tokenizer,
            skipping special tokens).

        Returns:
          ``[B]`` float32 expected scores.
        """
        decode_fn = decode_fn or functools.partial(decode_ids, self.tokenizer)
        prompt_ids = np.asarray(prompt_ids)
        response_ids = np.asarray(response_ids)
        response_mask = np.asarray(response_mask).astype(bool)
        if prompt_mask is None:
            prompt_mask = prompt_ids != self.lm.pad_token_id
        prompt_mask = np.asarray(prompt_mask).astype(bool)
        prompts = [decode_fn(row[m].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        responses = [decode_fn(row[m].tolist()) for row, m in zip(response_ids, response_mask)]
        return self(prompts, responses)
