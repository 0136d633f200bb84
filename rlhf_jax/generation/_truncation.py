"""Stop-token handling for sampled responses, as in lm-human-preferences and TRL.

Responses are right-padded ``[B, N]`` token arrays. These helpers find the first stop token,
replace everything after it with padding, build the response mask and penalise responses that
never produced a stop token. They are pure ``jnp`` functions usable inside or outside ``jit``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def first_true_indices(bools: jax.Array) -> jax.Array:
    """Index of the first ``True`` along the last axis, or the axis length when there is none.

    Same convention as TRL's ``first_true_indices``.

    Args:
      bools: ``[..., N]`` booleans.

    Returns:
      ``[...]`` int32 indices in ``[0, N]``.
    """
    n = bools.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    return jnp.min(jnp.where(bools, idx, n), axis=-1).astype(jnp.int32)


def _stop_hits(tokens: jax.Array, stop_token_id: int, start: int) -> jax.Array:
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
    return (tokens == stop_token_id) & (positions >= start)


def response_mask(tokens: jax.Array, *, stop_token_id: int, start: int = 0) -> jax.Array:
    """Mask that is 1 up to and including the first stop token (at index ``>= start``), 0 after.

    ``mask[b, t] = 1 if t <= first_stop[b] else 0``; a row with no stop token is all ones.

    Args:
      tokens: ``[B, N]`` response tokens.
      stop_token_id: the stop (usually EOS) token.
      start: ignore stop tokens before this index (lm-human-preferences' ``truncate_after``).

    Returns:
      ``[B, N]`` int32 mask.
    """
    chex.assert_rank(tokens, 2)
    first = first_true_indices(_stop_hits(tokens, stop_token_id, start))
    return (jnp.arange(tokens.shape[-1])[None, :] <= first[:, None]).astype(jnp.int32)


def truncate_response(
    tokens: jax.Array, *, stop_token_id: int, pad_token_id: int, start: int = 0
) -> jax.Array:
    """Replaces every token after the first stop token with ``pad_token_id`` (the stop is kept).

    ``out[b, t] = tokens[b, t] if t <= first_stop[b] else pad``. With ``start = 0`` this is TRL's
    ``truncate_response``; ``start > 0`` ignores stop tokens before that index, as
    lm-human-preferences' ``truncate_after`` does.

    Args:
      tokens: ``[B, N]`` response tokens.
      stop_token_id: the stop token (EOS, or e.g. a newline for single-line tasks).
      pad_token_id: the padding token written after it.
      start: first index at which a stop token counts.

    Returns:
      ``[B, N]`` tokens, same dtype.
    """
    mask = response_mask(tokens, stop_token_id=stop_token_id, start=start)
    return jnp.where(mask.astype(bool), tokens, jnp.asarray(pad_token_id, tokens.dtype))


def contains_stop_token(tokens: jax.Array, *, stop_token_id: int, start: int = 0) -> jax.Array:
    """Whether each response contains the stop token at an index ``>= start``.

    Args:
      tokens: ``[B, N]`` response tokens.
      stop_token_id: the stop token.
      start: first index at which a stop token counts.

    Returns:
      ``[B]`` bool.
    """
    chex.assert_rank(tokens, 2)
    return jnp.any(_stop_hits(tokens, stop_token_id, start), axis=-1)


def penalize_missing_eos(
    scores: jax.Array,
    tokens: jax.Array,
    *,
    eos_token_id: int,
    penalty: float | None = None,
    replace_with: float | None = None,
) -> jax.Array:
    """Penalises the scores of responses that never produced ``eos_token_id``.

    Exactly one of the two conventions:

    - ``penalty``: ``scores - penalty`` on rows without EOS (TRL's ``missing_eos_penalty``);
    - ``replace_with``: the score is replaced by this value (lm-human-preferences'
      ``penalty_reward_value`` for responses that fail the truncation filter).

    Args:
      scores: ``[B]`` scores (rewards) of the responses.
      tokens: ``[B, N]`` response tokens.
      eos_token_id: the token whose presence makes a response complete.
      penalty: amount subtracted from incomplete responses.
      replace_with: score given to incomplete responses.

    Returns:
      ``[B]`` float32 scores.
    """
    chex.assert_rank(scores, 1)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix([scores, tokens], 1)
    if (penalty is None) == (replace_with is None):
        raise ValueError(
            "penalize_missing_eos needs exactly one of penalty= (subtract, TRL) or "
            f"replace_with= (replace, lm-human-preferences); got penalty={penalty!r}, "
            f"replace_with={replace_with!r}"
        )
    scores = scores.astype(jnp.float32)
    complete = contains_stop_token(tokens, stop_token_id=eos_token_id)
    if penalty is not None:
        return jnp.where(complete, scores, scores - jnp.float32(penalty))
    return jnp.where(complete, scores, jnp.float32(replace_with))
