"""Reward-model losses (pairwise, K-wise, best-of-K) and reward metrics."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import as_mask, check_rank, check_same_shape, check_value, f32


def _soft_target(label: chex.Array | float | None, label_smoothing: chex.Array | float) -> chex.Array:
    """Probability that 'chosen' is preferred after label smoothing: p(1-e) + (1-p)e."""
    p = jnp.asarray(1.0 if label is None else label, jnp.float32)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    return p * (1.0 - eps) + (1.0 - p) * eps


def bradley_terry_loss(
    chosen_rewards: chex.Array,
    rejected_rewards: chex.Array,
    *,
    margin: chex.Array | float | None = None,
    label_smoothing: chex.Array | float = 0.0,
    label: chex.Array | float | None = None,
) -> chex.Array:
    r"""Pairwise Bradley-Terry reward-model loss, per pair.

    .. math::
        d = r_c - r_r - m, \qquad
        \mathcal{L} = -p \log\sigma(d) - (1 - p) \log\sigma(-d), \qquad
        p = \mathrm{label}\,(1-\varepsilon) + (1-\mathrm{label})\,\varepsilon

    With ``label=None`` (hard label 1) and ``label_smoothing=0`` this is
    :math:`-\log\sigma(r_c - r_r - m)`, the Llama-2 margin loss and TRL ``RewardTrainer``'s
    loss (``margin`` column). A soft ``label`` (probability that chosen is preferred, e.g. an AI
    judge's) gives the binary cross-entropy against that probability, as used for RLAIF.

    Args:
      chosen_rewards: ``[B]`` scalar rewards of the chosen responses.
      rejected_rewards: ``[B]`` rewards of the rejected responses.
      margin: optional ``[B]`` (or scalar) margin :math:`m` (keyword-only).
      label_smoothing: :math:`\varepsilon`, scalar or ``[B]``.
      label: optional ``[B]`` (or scalar) probability that chosen is preferred.

    Returns:
      ``[B]`` float32 losses.
    """
    check_rank("chosen_rewards", chosen_rewards, 1)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    check_value("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_value("label", label, low=0.0, high=1.0)
    check_value("margin", margin)
    d = f32(chosen_rewards) - f32(rejected_rewards)
    if margin is not None:
        d = d - f32(margin)
    p = _soft_target(label, label_smoothing)
    return -p * jax.nn.log_sigmoid(d) - (1.0 - p) * jax.nn.log_sigmoid(-d)


def reward_centering_loss(
    chosen_rewards: chex.Array, rejected_rewards: chex.Array, *, coefficient: float = 1.0
) -> chex.Array:
    r"""Auxiliary loss that keeps rewards centred at zero, per pair.

    .. math:: \mathcal{L} = c \,(r_c + r_r)^2

    Its batch mean is TRL ``RewardTrainer``'s ``center_rewards_coefficient`` term
    (Eisenstein et al., 2023), with ``coefficient`` = ``center_rewards_coefficient``.

    Args:
      chosen_rewards: ``[B]``.
      rejected_rewards: ``[B]``.
      coefficient: :math:`c` (keyword-only); leave at 1 to apply it yourself.

    Returns:
      ``[B]`` float32.
    """
    check_rank("chosen_rewards", chosen_rewards, 1)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    check_value("coefficient", coefficient, low=0.0)
    return coefficient * (f32(chosen_rewards) + f32(rejected_rewards)) ** 2


def _check_k(rewards: chex.Array, mask: chex.Array | None) -> chex.Array:
    check_rank("rewards", rewards, 2)
    if mask is None:
        return jnp.ones(rewards.shape, jnp.float32)
    check_same_shape(rewards=rewards, mask=mask)
    return as_mask(mask)


def kwise_ranking_loss(
    rewards: chex.Array,
    ranks: chex.Array | None = None,
    *,
    preference_probs: chex.Array | None = None,
    mask: chex.Array | None = None,
) -> chex.Array:
    r"""InstructGPT K-wise comparison loss: all :math:`\binom{K}{2}` pairs, each prompt weighted once.

    For prompt :math:`b` with :math:`P_b` valid unordered pairs :math:`\{i, j\}`
    (both completions valid, and with hard ranks, not tied):

    .. math::
        \mathcal{L}_b = \frac{1}{P_b} \sum_{\{i,j\}}
          -\big[p_{ij} \log\sigma(r_i - r_j) + (1 - p_{ij}) \log\sigma(r_j - r_i)\big]

    with :math:`p_{ij} = 1` if ``ranks[i] < ranks[j]`` (rank 0 = best), 0 if greater
    (Ouyang et al. 2022, eq. 1: the :math:`1/\binom{K}{2}` factor and one gradient step per
    prompt, i.e. every prompt weighs once in the batch mean). Soft labels: pass
    ``preference_probs[b, i, j]`` = probability that ``i`` is preferred to ``j`` (only the
    entries ``i < j`` are read) instead of ``ranks``. Prompts with no valid pair get loss 0.

    Args:
      rewards: ``[B, K]`` rewards of the K completions of each prompt.
      ranks: ``[B, K]`` integer ranks, 0 = best; ties are not compared.
      preference_probs: ``[B, K, K]`` soft pairwise preferences (keyword-only), instead of
        ``ranks``.
      mask: optional ``[B, K]``, 1 for completions that exist.

    Returns:
      ``[B]`` float32 per-prompt losses.
    """
    m = _check_k(rewards, mask)
    if (ranks is None) == (preference_probs is None):
        raise ValueError("kwise_ranking_loss needs exactly one of `ranks` or `preference_probs`")
    b, k = rewards.shape
    r = f32(rewards)
    upper = jnp.triu(jnp.ones((k, k), jnp.float32), 1)[None]  # pairs i < j
    valid = upper * m[:, :, None] * m[:, None, :]
    if ranks is not None:
        check_same_shape(rewards=rewards, ranks=ranks)
        ri, rj = ranks[:, :, None], ranks[:, None, :]
        p = jnp.where(ri < rj, 1.0, 0.0)
        valid = valid * (ri != rj)
    else:
        check_rank("preference_probs", preference_probs, 3)
        if preference_probs.shape != (b, k, k):
            raise ValueError(
                f"preference_probs must have shape {(b, k, k)}, got {preference_probs.shape}"
            )
        p = f32(preference_probs)
    d = r[:, :, None] - r[:, None, :]
    pair_loss = -p * jax.nn.log_sigmoid(d) - (1.0 - p) * jax.nn.log_sigmoid(-d)
    pair_loss = jnp.where(valid > 0, pair_loss, 0.0)
    n_pairs = jnp.sum(valid, axis=(1, 2))
    return jnp.sum(pair_loss, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)


def plackett_luce_loss(
    rewards: chex.Array, ranks: chex.Array, *, mask: chex.Array | None = None
) -> chex.Array:
    r"""Plackett-Luce negative log-likelihood of a full ranking, per prompt.

    With :math:`\sigma` the ranking (best first) over the valid completions:

    .. math::
        \mathcal{L}_b = -\sum_{k} \Big[ r_{\sigma(k)} - \log \sum_{j \ge k} e^{r_{\sigma(j)}} \Big]

    For K = 2 this is the Bradley-Terry loss. Tied ranks share a risk set (each tied item's
    denominator includes the others).

    Args:
      rewards: ``[B, K]``.
      ranks: ``[B, K]`` integer ranks, 0 = best.
      mask: optional ``[B, K]``, 1 for completions that exist.

    Returns:
      ``[B]`` float32.
    """
    m = _check_k(rewards, mask)
    check_same_shape(rewards=rewards, ranks=ranks)
    r = f32(rewards)
    # risk[b, i, j] = 1 if j is still in the pool when i is chosen (rank_j >= rank_i).
    risk = (ranks[:, None, :] >= ranks[:, :, None]) * m[:, None, :]
    pool = jnp.broadcast_to(r[:, None, :], risk.shape)
    lse = jax.nn.logsumexp(jnp.where(risk > 0, pool, 0.0), axis=-1, where=risk > 0)
    term = jnp.where(m > 0, r - jnp.where(m > 0, lse, 0.0), 0.0)
    return -jnp.sum(term, axis=-1)


def best_of_k_loss(
    rewards: chex.Array, best: chex.Array, *, mask: chex.Array | None = None
) -> chex.Array:
    r"""Softmax cross-entropy over K completions against the best one (lm-human-preferences).

    .. math:: \mathcal{L}_b = -\sum_k q_{bk} \log \mathrm{softmax}(r_b)_k

    with :math:`q` one-hot at ``best`` (the reward-model loss of Ziegler et al. 2019 /
    lm-human-preferences, where labellers pick the best of K samples), or a soft distribution
    ``best [B, K]`` over the completions.

    Args:
      rewards: ``[B, K]``.
      best: ``[B]`` integer index of the best completion, or ``[B, K]`` target probabilities.
      mask: optional ``[B, K]``; missing completions are excluded from the softmax.

    Returns:
      ``[B]`` float32.
    """
    m = _check_k(rewards, mask)
    b, k = rewards.shape
    if best.ndim == 1:
        check_rank("best", best, 1)
        if best.shape[0] != b:
            raise ValueError(f"best must have shape ({b},), got {best.shape}")
        q = jax.nn.one_hot(best, k, dtype=jnp.float32)
    else:
        check_rank("best", best, 2)
        check_same_shape(rewards=rewards, best=best)
        q = f32(best)
    logp = jax.nn.log_softmax(f32(rewards), axis=-1, where=m > 0)
    return -jnp.sum(jnp.where(m > 0, q * jnp.where(m > 0, logp, 0.0), 0.0), axis=-1)


class RewardMetrics(NamedTuple):
    """Per-pair reward-model diagnostics (``[B]`` each)."""

    accuracy: chex.Array
    margin: chex.Array
    chosen: chex.Array
    rejected: chex.Array


def reward_accuracy(
    chosen_rewards: chex.Array, rejected_rewards: chex.Array, *, label: chex.Array | None = None
) -> chex.Array:
    r"""Per-pair agreement with the preference: :math:`1[r_c > r_r]`.

    With a soft ``label`` (probability chosen is preferred) the expected agreement
    :math:`p\,1[r_c > r_r] + (1-p)\,1[r_c < r_r]`. Ties count as wrong.

    Returns:
      ``[B]`` float32 in [0, 1].
    """
    check_rank("chosen_rewards", chosen_rewards, 1)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    c, r = f32(chosen_rewards), f32(rejected_rewards)
    win = (c > r).astype(jnp.float32)
    if label is None:
        return win
    p = f32(label)
    return p * win + (1.0 - p) * (c < r).astype(jnp.float32)


def reward_margin(chosen_rewards: chex.Array, rejected_rewards: chex.Array) -> chex.Array:
    """Per-pair reward margin :math:`r_c - r_r`, ``[B]`` float32."""
    check_rank("chosen_rewards", chosen_rewards, 1)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return f32(chosen_rewards) - f32(rejected_rewards)


def reward_metrics(
    chosen_rewards: chex.Array, rejected_rewards: chex.Array, *, label: chex.Array | None = None
) -> RewardMetrics:
    """Accuracy, margin, chosen and rejected rewards per pair (log as ``"rm/accuracy"``, ...)."""
    return RewardMetrics(
        accuracy=reward_accuracy(chosen_rewards, rejected_rewards, label=label),
        margin=reward_margin(chosen_rewards, rejected_rewards),
        chosen=f32(chosen_rewards),
        rejected=f32(rejected_rewards),
    )
