"""A rollout: one batch of prompts answered by the current policy, its layout, how it is sampled
and how it is cut into minibatches (PPO, GRPO, RLOO, rejection sampling).

Layout (`Rollout`): the prompt (left-padded, ``P`` columns) followed by the response
(right-padded, ``N`` columns) in one ``[B, P + N]`` row, so every model (policy, reference,
value, reward) runs one forward pass over the same array; `rlhf_jax.train.logprobs` reads the
per-response-token arrays ``[B, N]`` out of it. With ``num_samples = n`` per prompt the rows of
prompt ``b`` are ``b * n .. b * n + n - 1``.

Sampling (`sample_rollout`): `rlhf_jax.generation.generate_with_state` with the run's
`RolloutConfig` (a `rlhf_jax.generation.SamplingParams` plus the stop token and the missing-EOS
penalty). A `Rollout` is a `rlhf_jax.generation.Responses`, so every reward source scores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.generation import GenerationOutput, SamplingParams, generate_with_state
from rlhf_jax.train.config import check_int, check_number

# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """Sampled responses in the layout every scoring model reads.

    ``B`` rows; with ``num_samples = n`` per prompt the rows of prompt ``b`` are
    ``b * n .. b * n + n - 1`` (contiguous groups, as `rlhf_jax.generation` returns them).

    Attributes:
      sequences: ``[B, P + N]`` int32 prompt (left-padded) then response (right-padded).
      sequence_mask: ``[B, P + N]`` int32, 1 on real prompt tokens and on response tokens up to
        and including the first stop token.
      response_ids: ``[B, N]`` int32 ``sequences[:, P:]`` (pad after the first stop token).
      response_mask: ``[B, N]`` int32 ``sequence_mask[:, P:]``.
      finished: ``[B]`` bool, whether the response produced the EOS token (for the missing-EOS
        penalty).
    """

    sequences: jax.Array
    sequence_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    finished: jax.Array

    @property
    def prompt_length(self) -> int:
        """``P``, the padded prompt width (static)."""
        return self.sequences.shape[1] - self.response_ids.shape[1]

    @property
    def prompt_ids(self) -> jax.Array:
        """``[B, P]`` left-padded prompt tokens."""
        return self.sequences[:, : self.prompt_length]

    @property
    def prompt_mask(self) -> jax.Array:
        """``[B, P]`` prompt mask."""
        return self.sequence_mask[:, : self.prompt_length]

# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutConfig(SamplingParams):
    """How responses are sampled (the `rlhf_jax.generation.SamplingParams` fields) and
    post-processed before scoring.

    ``temperature`` also divides the logits of the log-probs the losses use; those are the
    tempered, unfiltered policy log-probs (as TRL's), so the ``top_k``, ``top_p`` and ``min_p``
    filters make the rollout slightly off-policy.
    """

    max_new_tokens: int = 16
    """Response width ``N`` (tokens sampled per prompt at most)."""
    stop_token_id: int | None = None
    """Stop token that ends a response (defaults to the EOS token)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses without the EOS token (TRL's
    ``missing_eos_penalty``); None: no penalty."""

    def __post_init__(self):
        o = "rollout."
        check_int(self, "max_new_tokens", low=1, owner=o)
        check_number(self, "temperature", low=0, low_open=True, owner=o)
        check_int(self, "top_k", low=1, optional=True, owner=o)
        check_number(self, "top_p", low=0, high=1, low_open=True, optional=True, owner=o)
        check_number(self, "min_p", low=0, high=1, optional=True, owner=o)
        check_int(self, "stop_token_id", low=0, optional=True, owner=o)
        check_number(self, "missing_eos_penalty", optional=True, owner=o)
        check_int(self, "cache_segments", low=1, high=self.max_new_tokens, optional=True,
                  owner=o)


def rollout_from_generation(output: GenerationOutput) -> Rollout:
    """`Rollout` view of a `rlhf_jax.generation.GenerationOutput`."""
    return Rollout(
        sequences=output.sequences,
        sequence_mask=output.sequence_mask,
        response_ids=output.tokens,
        response_mask=output.mask,
        finished=output.finished,
    )


def sample_rollout(
    graphdef: Any,
    state: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    *,
    rng: jax.Array,
    config: RolloutConfig,
    eos_token_id: int,
    pad_token_id: int,
    num_samples: int = 1,
    mesh: Any = None,
) -> Rollout:
    """Samples ``num_samples`` responses per prompt from the policy ``nnx.merge(graphdef, state)``.

    Generation (one jitted prefill + decode loop) stops a row at ``config.stop_token_id``
    (default ``eos_token_id``); everything after it is ``pad_token_id`` and masked out.

    Returns:
      A `Rollout` with ``B * num_samples`` rows.
    """
    stop = eos_token_id if config.stop_token_id is None else config.stop_token_id
    output = generate_with_state(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        config,
        rng=rng,
        eos_token_id=int(stop),
        pad_token_id=int(pad_token_id),
        num_samples=num_samples,
        mesh=mesh,
    )
    rollout = rollout_from_generation(output)
    if stop != eos_token_id:
        # Truncated at a stop token that is not EOS: "finished" still means "produced EOS".
        rollout = rollout._replace(
            finished=jnp.any((rollout.response_ids == eos_token_id) & (rollout.response_mask > 0),
                             axis=-1)
        )
    return rollout

# ---------------------------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------------------------


def minibatch_indices(
    rng: jax.Array, *, batch_size: int, num_minibatches: int, num_epochs: int
) -> jax.Array:
    """``[num_epochs * num_minibatches, batch_size // num_minibatches]`` int32 row indices.

    Each epoch is a fresh permutation of the ``batch_size`` rows (``fold_in(rng, epoch)``) cut
    into ``num_minibatches`` equal minibatches, as TRL's PPO epochs over ``np.random.permutation``.
    """
    if batch_size % num_minibatches:
        raise ValueError(
            f"num_minibatches={num_minibatches} must divide the rollout batch size {batch_size}"
        )
    size = batch_size // num_minibatches
    perms = [
        jax.random.permutation(jax.random.fold_in(rng, e), batch_size) for e in range(num_epochs)
    ]
    return jnp.stack(perms).reshape(num_epochs * num_minibatches, size).astype(jnp.int32)


def take_minibatch(tree: Any, indices: jax.Array) -> Any:
    """Rows ``indices`` of every ``[B, ...]`` leaf of ``tree``."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), tree)


__all__ = [
    "Rollout",
    "RolloutConfig",
    "minibatch_indices",
    "rollout_from_generation",
    "sample_rollout",
    "take_minibatch",
]
