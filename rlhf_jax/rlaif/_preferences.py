"""Judge arithmetic on next-token logits: answer-token preferences, position debiasing, scores.

Pure functions on arrays (jittable). The judge reads the next-token logits at the answer
position, ``logits [B, V]``, and restricts them to a few answer tokens; the normalisation over
those tokens makes the rest of the vocabulary irrelevant (the full-vocabulary log-partition
cancels).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def answer_preference(logits: chex.Array, answer_ids: chex.Array) -> chex.Array:
    """P(first answer token) normalised over the two answer tokens.

    .. math::
        p_b = \\frac{e^{z_{b,a_1}}}{e^{z_{b,a_1}} + e^{z_{b,a_2}}} = \\sigma(z_{b,a_1} - z_{b,a_2})

    Args:
      logits: ``[B, V]`` next-token logits (or log-probs) at the answer position.
      answer_ids: ``[2]`` int token ids of the answers for response 1 and response 2.

    Returns:
      ``[B]`` float32 probability that response 1 is preferred, in this presentation order.
    """
    chex.assert_rank(logits, 2)
    chex.assert_shape(answer_ids, (2,))
    z = logits.astype(jnp.float32)[:, answer_ids]  # [B, 2]
    return jax.nn.sigmoid(z[:, 0] - z[:, 1])


def debias_position(prob_forward: chex.Array, prob_reverse: chex.Array) -> chex.Array:
    """Position-debiased preference from both presentation orders (Lee et al. 2023, sec. 2.1.1).

    .. math::
        p = \\tfrac12 \\big(p_{12} + (1 - p_{21})\\big)

    where ``p_12`` is P(answer "response 1") with the responses shown as (1, 2) and ``p_21`` is
    P(answer "response 1") with them swapped, i.e. the probability that the *original* second
    response is better. A constant bias towards the first slot cancels.

    Args:
      prob_forward: ``[B]`` P(first slot better) with the original order.
      prob_reverse: ``[B]`` P(first slot better) with the swapped order.

    Returns:
      ``[B]`` float32 P(original response 1 better).
    """
    chex.assert_equal_shape([prob_forward, prob_reverse])
    pf = prob_forward.astype(jnp.float32)
    pr = prob_reverse.astype(jnp.float32)
    return 0.5 * (pf + (1.0 - pr))


def position_bias(prob_forward: chex.Array, prob_reverse: chex.Array) -> chex.Array:
    """Per-example preference for the first slot, ``(p_12 + p_21) / 2 - 1/2``, in ``[-1/2, 1/2]``.

    Zero for an order-consistent judge; positive when the judge favours whichever response it
    sees first.

    Args:
      prob_forward: ``[B]`` P(first slot better), original order.
      prob_reverse: ``[B]`` P(first slot better), swapped order.

    Returns:
      ``[B]`` float32.
    """
    chex.assert_equal_shape([prob_forward, prob_reverse])
    return 0.5 * (prob_forward.astype(jnp.float32) + prob_reverse.astype(jnp.float32)) - 0.5


def score_distribution(logits: chex.Array, score_ids: chex.Array) -> chex.Array:
    """Probabilities of the score tokens, normalised over them: ``softmax(z[:, score_ids])``.

    Args:
      logits: ``[B, V]`` next-token logits at the score position.
      score_ids: ``[K]`` int token ids of the scores.

    Returns:
      ``[B, K]`` float32 rows summing to 1.
    """
    chex.assert_rank(logits, 2)
    chex.assert_rank(score_ids, 1)
    return jax.nn.softmax(logits.astype(jnp.float32)[:, score_ids], axis=-1)


def expected_score(
    logits: chex.Array, score_ids: chex.Array, score_values: chex.Array
) -> chex.Array:
    """Expected rating under the normalised score-token distribution (direct RLAIF).

    .. math::
        s_b = \\sum_k v_k \\, \\mathrm{softmax}(z_{b, \\mathrm{ids}})_k

    Lee et al. (2023, sec. 2.2: "d-RLAIF") score 1-10 this way and use ``s`` as the reward.

    Args:
      logits: ``[B, V]`` next-token logits at the score position.
      score_ids: ``[K]`` int token ids of the scores.
      score_values: ``[K]`` the value of each score token (e.g. 1..10).

    Returns:
      ``[B]`` float32 expected scores.
    """
    chex.assert_equal_shape([score_ids, score_values])
    probs = score_distribution(logits, score_ids)
    return probs @ score_values.astype(jnp.float32)


def soft_to_preference_label(prob_first: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Maps P(response 1 better) to (chosen index, P(chosen better)).

    The chosen response is the more probable one (response 1 on exact ties), and its label is
    ``max(p, 1 - p)`` in ``[1/2, 1]``, the "probability that chosen is preferred" of the
    pairwise batch format.

    Args:
      prob_first: ``[B]`` P(response 1 better).

    Returns:
      ``(chosen_is_first [B] bool, label [B] float32)``.
    """
    chex.assert_rank(prob_first, 1)
    p = prob_first.astype(jnp.float32)
    first = p >= 0.5
    return first, jnp.where(first, p, 1.0 - p)
