"""Best-of-n (rejection) sampling: draw n responses per prompt, keep the best (and the worst).

Rejection sampling as in Llama 2 (Touvron et al., 2023, section 3.2.3): sample ``n`` responses per
prompt, score them with a reward model or a reward function, keep the highest-scoring one for
fine-tuning. Keeping the lowest-scoring one as well gives a (chosen, rejected) preference pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation._sampler import GenerationOutput, Sampler


class BestOfNSelection(NamedTuple):
    """Which of the ``n`` samples of each prompt were kept.

    Indices are flat row indices into the ``[B * n, ...]`` generation output (rows
    ``b * n .. b * n + n - 1`` belong to prompt ``b``).

    Attributes:
      best_indices: ``[B]`` int32 row of the highest score of each group (first on ties).
      best_scores: ``[B]`` its score.
      worst_indices: ``[B]`` int32 row of the lowest score of each group (first on ties).
      worst_scores: ``[B]`` its score.
    """

    best_indices: jax.Array
    best_scores: jax.Array
    worst_indices: jax.Array
    worst_scores: jax.Array


def select_best_of_n(scores: jax.Array, *, num_samples: int) -> BestOfNSelection:
    """Picks the best and worst of each contiguous group of ``num_samples`` scores.

    ``best[b] = b * n + argmax_j scores[b * n + j]`` and likewise with ``argmin`` for the worst.

    Args:
      scores: ``[B * n]`` scores, grouped contiguously per prompt.
      num_samples: group size ``n >= 1``.

    Returns:
      A :class:`BestOfNSelection` of ``[B]`` arrays.
    """
    chex.assert_rank(scores, 1)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if scores.shape[0] % num_samples:
        raise ValueError(
            f"scores has {scores.shape[0]} rows, not a multiple of num_samples={num_samples}"
        )
    grouped = scores.reshape(-1, num_samples)
    offsets = jnp.arange(grouped.shape[0], dtype=jnp.int32) * num_samples
    best = jnp.argmax(grouped, axis=-1).astype(jnp.int32)
    worst = jnp.argmin(grouped, axis=-1).astype(jnp.int32)
    return BestOfNSelection(
        best_indices=offsets + best,
        best_scores=jnp.take_along_axis(grouped, best[:, None], axis=-1)[:, 0],
        worst_indices=offsets + worst,
        worst_scores=jnp.take_along_axis(grouped, worst[:, None], axis=-1)[:, 0],
    )


class BestOfNOutput(NamedTuple):
    """Result of :func:`best_of_n`.

    Attributes:
      best: :class:`GenerationOutput` of the kept responses, ``[B, ...]`` rows (one per prompt).
      worst: :class:`GenerationOutput` of the lowest-scoring responses, or ``None`` unless
        ``return_worst``.
      selection: the :class:`BestOfNSelection` (flat indices into ``samples`` and their scores).
      scores: ``[B, n]`` float32 scores of all samples.
      samples: the full ``[B * n, ...]`` :class:`GenerationOutput`.
    """

    best: GenerationOutput
    worst: GenerationOutput | None
    selection: BestOfNSelection
    scores: jax.Array
    samples: GenerationOutput


def take_rows(output: GenerationOutput, indices: jax.Array) -> GenerationOutput:
    """Gathers rows ``indices`` (``[K]``) of every array field of a :class:`GenerationOutput`."""
    return GenerationOutput(
        *(
            value if name == "prompt_length" else jnp.take(value, indices, axis=0)
            for name, value in zip(GenerationOutput._fields, output)
        )
    )


RewardFn = Callable[[GenerationOutput], Any]


def text_reward(
    fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
    *,
    decode: Callable[[Sequence[int]], str],
) -> RewardFn:
    """Wraps a reward on decoded text, ``fn(prompts, responses) -> scores``, as a ``reward_fn``.

    Prompts are decoded from their real (unpadded) tokens; responses from the tokens under
    ``mask`` (so they include the EOS token when one was produced; have ``decode`` skip special
    tokens if the reward should not see it).

    Args:
      fn: maps ``B * n`` prompt strings and response strings to ``B * n`` scores.
      decode: token ids -> string, e.g. ``lambda ids: tokenizer.decode(ids,
        skip_special_tokens=True)``.

    Returns:
      A function of a :class:`GenerationOutput` returning ``[B * n]`` float32 scores.
    """

    def reward_fn(output: GenerationOutput) -> np.ndarray:
        p = output.prompt_length
        seqs = np.asarray(output.sequences)
        seq_mask = np.asarray(output.sequence_mask).astype(bool)
        prompts = [decode(row[:p][m[:p]].tolist()) for row, m in zip(seqs, seq_mask)]
        responses = [decode(row[p:][m[p:]].tolist()) for row, m in zip(seqs, seq_mask)]
        return np.asarray(fn(prompts, responses), np.float32)

    return reward_fn


def reward_model_reward(reward_model: Any, *, head: int = 0) -> RewardFn:
    """Scores ``output.sequences`` with a reward model ``rm(ids, attention_mask, positions)``.

    The model reads its score at the last real token of each row (``rlhf_jax.models.RewardModel``
    convention); positions are ``cumsum(sequence_mask) - 1`` clipped at 0, as for the policy.

    Args:
      reward_model: callable ``(input_ids, attention_mask=..., positions=...) -> [B, H]``.
      head: which reward head to use.

    Returns:
      A function of a :class:`GenerationOutput` returning ``[B * n]`` float32 scores.
    """

    def reward_fn(output: GenerationOutput) -> jax.Array:
        mask = output.sequence_mask
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        rewards = reward_model(output.sequences, attention_mask=mask, positions=positions)
        return jnp.asarray(rewards, jnp.float32)[:, head]

    return reward_fn


def best_of_n(
    sampler: Sampler | Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    num_samples: int,
    reward_fn: RewardFn,
    rng: jax.Array,
    return_worst: bool = False,
    **generate_kwargs: Any,
) -> BestOfNOutput:
    """Samples ``n`` responses per prompt, scores them and keeps the best (and the worst).

    Args:
      sampler: a :class:`Sampler` or an NNX ``CausalLM`` (wrapped in a ``Sampler``).
      prompt_ids: ``[B, P]`` left-padded prompts.
      prompt_mask: ``[B, P]`` prompt mask.
      num_samples: ``n``; ``n >= 2`` when ``return_worst``.
      reward_fn: ``GenerationOutput ([B * n] rows) -> [B * n]`` scores; see
        :func:`reward_model_reward` and :func:`text_reward`. Scores must be finite.
      rng: PRNG key for sampling.
      return_worst: also return the lowest-scoring sample of each prompt (preference pairs).
      **generate_kwargs: forwarded to :meth:`Sampler.generate` (``max_new_tokens``,
        ``eos_token_id``, ``pad_token_id``, ``temperature``, ``top_k``, ...).

    Returns:
      A :class:`BestOfNOutput`.
    """
    if return_worst and num_samples < 2:
        raise ValueError(f"return_worst=True needs num_samples >= 2, got {num_samples}")
    if not isinstance(sampler, Sampler):
        sampler = Sampler(sampler)
    samples = sampler.generate(
        prompt_ids, prompt_mask, rng=rng, num_samples=num_samples, **generate_kwargs
    )
    scores = jnp.asarray(reward_fn(samples), jnp.float32)
    expected = (samples.tokens.shape[0],)
    if scores.shape != expected:
        raise ValueError(f"reward_fn returned scores of shape {scores.shape}, expected {expected}")
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores)))
    if bad.size:
        raise ValueError(f"reward_fn returned non-finite scores at rows {bad[:10].tolist()}")
    selection = select_best_of_n(scores, num_samples=num_samples)
    return BestOfNOutput(
        best=take_rows(samples, selection.best_indices),
        worst=take_rows(samples, selection.worst_indices) if return_worst else None,
        selection=selection,
        scores=scores.reshape(-1, num_samples),
        samples=samples,
    )
