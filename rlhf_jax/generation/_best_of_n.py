"""Best-of-n (rejection) sampling: draw n responses per prompt, keep the best (and the worst).

Rejection sampling as in Llama 2 (Touvron et al., 2023, section 3.2.3): sample ``n`` responses per
prompt, score them with a reward source (`rlhf_jax.generation.RewardSource`: a reward model, a
function of tokens or text, an AI labeler), keep the highest-scoring one for fine-tuning.
Keeping the lowest-scoring one as well gives a (chosen, rejected) preference pair.

On several processes (a multi-host slice, with a `Sampler` on the global mesh) every process
calls `best_of_n` with the same prompts: the samples stay global arrays on the mesh, the reward
source scores the whole batch and every process gets the whole ``[B * n]`` scores
(`rlhf_jax.sharding.gather_to_host`), selects the same rows, and gathers them on the devices with
the indices replicated over the samples' mesh. The kept rows are global arrays (read them with
``gather_to_host``); the selection and the scores are host values, the same on every process.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.generation._rewards import RewardSource, score_samples
from rlhf_jax.generation._sampler import GenerationOutput, Sampler, SamplingParams
from rlhf_jax.sharding import gather_to_host, global_from_host


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
    return _select(scores, num_samples=num_samples)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _select(scores: jax.Array, *, num_samples: int) -> BestOfNSelection:
    # One compiled program per (rows, n), rather than one per eager operation.
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
    """Gathers rows ``indices`` (``[K]``, the same on every process) of every array field of a
    :class:`GenerationOutput`; on a mesh the indices are replicated over it and the rows stay
    on its devices."""
    arrays = {name: getattr(output, name) for name in GenerationOutput._fields
              if name != "prompt_length"}
    where = output.sequences.sharding
    if isinstance(where, NamedSharding):
        indices = global_from_host(gather_to_host(indices),
                                   NamedSharding(where.mesh, PartitionSpec()))
    return GenerationOutput(**_take(arrays, indices), prompt_length=output.prompt_length)


@jax.jit
def _take(arrays: dict[str, jax.Array], indices: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.take(value, indices, axis=0) for name, value in arrays.items()}


def best_of_n(
    sampler: Sampler | Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    sampling: SamplingParams,
    *,
    num_samples: int,
    reward: RewardSource,
    rng: jax.Array,
    eos_token_id: int | None,
    pad_token_id: int,
    prompts: Mapping[str, Any] | None = None,
    missing_eos_penalty: float | None = None,
    return_worst: bool = False,
) -> BestOfNOutput:
    """Samples ``n`` responses per prompt, scores them and keeps the best (and the worst).

    Args:
      sampler: a :class:`Sampler` or an NNX ``CausalLM`` (wrapped in a ``Sampler``).
      prompt_ids: ``[B, P]`` left-padded prompts.
      prompt_mask: ``[B, P]`` prompt mask.
      sampling: how to sample (:class:`SamplingParams`).
      num_samples: ``n``; ``n >= 2`` when ``return_worst``.
      reward: a :class:`RewardSource` (e.g. :class:`RewardModelSource`,
        :class:`TextRewardFunction`, an AI labeler's ``reward_source()``); it sees the ``B * n``
        samples and the prompt fields repeated to them. Scores must be finite.
      rng: PRNG key for sampling.
      eos_token_id, pad_token_id: as in :func:`generate`.
      prompts: extra ``[B, ...]`` prompt fields the reward reads (e.g. a safety flag);
        ``prompt_ids`` and ``prompt_mask`` are always passed (host or global arrays: the reward
        reads them gathered to the host).
      missing_eos_penalty: subtracted from the score of samples without EOS (None: off).
      return_worst: also return the lowest-scoring sample of each prompt (preference pairs).

    Returns:
      A :class:`BestOfNOutput`: ``best`` / ``worst`` / ``samples`` placed as the sampler put them
      (global arrays on its mesh), ``selection`` and ``scores`` the whole batch's on every
      process.
    """
    if return_worst and num_samples < 2:
        raise ValueError(f"return_worst=True needs num_samples >= 2, got {num_samples}")
    if not isinstance(sampler, Sampler):
        sampler = Sampler(sampler)
    samples = sampler.generate(
        prompt_ids, prompt_mask, sampling, rng=rng, num_samples=num_samples,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    fields = {**(prompts or {}), "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
    scores = score_samples(reward, samples, gather_to_host(fields), num_samples=num_samples,
                           missing_eos_penalty=missing_eos_penalty)
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores)))
    if bad.size:
        raise ValueError(f"reward source {reward.name!r} returned non-finite scores at rows "
                         f"{bad[:10].tolist()}")
    selection = select_best_of_n(scores, num_samples=num_samples)
    return BestOfNOutput(
        best=take_rows(samples, selection.best_indices),
        worst=take_rows(samples, selection.worst_indices) if return_worst else None,
        selection=selection,
        scores=scores.reshape(-1, num_samples),
        samples=samples,
    )
