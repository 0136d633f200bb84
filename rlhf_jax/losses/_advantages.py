"""Advantage estimators: GAE, group-relative (GRPO), leave-one-out (RLOO), KL-shaped rewards."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import (
    as_mask,
    check_choice,
    check_rank,
    check_same_shape,
    check_value,
    f32,
)
from rlhf_jax.losses._kl import kl_estimate

GROUP_SCALES = ("group", "batch", "none")
REWARD_KL_ESTIMATORS = ("k1", "k2", "k3")


class GAEOutput(NamedTuple):
    """``advantages [B, T]`` and ``returns [B, T]`` (= advantages + values), 0 on padding."""

    advantages: chex.Array
    returns: chex.Array


def gae(
    rewards: chex.Array,
    values: chex.Array,
    mask: chex.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAEOutput:
    r"""Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    Values after the last real token are 0 (the episode ends there), as in
    lm-human-preferences and TRL PPO:

    .. math::
        \delta_t = r_t + \gamma V_{t+1} - V_t,\qquad
        \hat A_t = \delta_t + \gamma\lambda \hat A_{t+1},\qquad
        \hat A_T = 0,\qquad R_t = \hat A_t + V_t

    computed with a reverse ``lax.scan`` over time. Rewards and values are multiplied by the
    mask first, so padding contributes nothing; the outputs are 0 on padding. Whitening of the
    advantages is separate (:func:`masked_whiten`). The inputs are treated as constants
    (gradient stopped), as PPO uses them.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. :func:`kl_penalized_rewards`).
      values: ``[B, T]`` value estimates :math:`V_t`.
      mask: ``[B, T]`` 1 on response tokens (right-padded).
      gamma: discount :math:`\gamma \in [0, 1]` (keyword-only).
      lam: GAE :math:`\lambda \in [0, 1]`.

    Returns:
      :class:`GAEOutput` ``(advantages, returns)``, each ``[B, T]`` float32.
    """
    check_rank("rewards", rewards, 2)
    check_same_shape(rewards=rewards, values=values, mask=mask)
    check_value("gamma", gamma, low=0.0, high=1.0)
    check_value("lam", lam, low=0.0, high=1.0)
    m = as_mask(mask)
    r = jax.lax.stop_gradient(jnp.where(m > 0, f32(rewards), 0.0))
    v = jax.lax.stop_gradient(jnp.where(m > 0, f32(values), 0.0))
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * next_v - v

    def step(carry, delta_t):
        adv = delta_t + gamma * lam * carry
        return adv, adv

    _, adv_t = jax.lax.scan(step, jnp.zeros(r.shape[0], jnp.float32), deltas.T, reverse=True)
    adv = adv_t.T * m
    return GAEOutput(advantages=adv, returns=(adv + v) * m)


def _grouped(rewards: chex.Array, group_size: int) -> chex.Array:
    check_rank("rewards", rewards, 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards.shape[0]={rewards.shape[0]} is not a multiple of group_size={group_size}"
        )
    return f32(rewards).reshape(-1, group_size)


def _std_ddof1(x: chex.Array, axis=None, keepdims: bool = False) -> chex.Array:
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=keepdims))
    return jnp.std(x, axis=axis, keepdims=keepdims, ddof=1)


def group_advantages(
    rewards: chex.Array,
    *,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    axis_name: str | None = None,
) -> chex.Array:
    r"""GRPO group-relative advantages, matching TRL ``GRPOTrainer`` (``scale_rewards``).

    Rewards come in contiguous groups of ``group_size`` completions of one prompt
    (``rewards.reshape(-1, group_size)``, TRL's ``view(-1, num_generations)``):

    .. math::
        A_i = \frac{r_i - \mathrm{mean}_{\mathrm{group}}(r)}{\mathrm{std}(r) + \epsilon}

    with the standard deviation over the group (``scale="group"``), over the whole batch
    (``"batch"``; the mean is still the group's), or no division (``"none"``, Dr. GRPO). The
    standard deviation is **unbiased (ddof = 1)**, as TRL's ``nanstd`` (Bessel's correction),
    and :math:`\epsilon = 10^{-4}` as TRL. With ``axis_name`` the batch std of ``"batch"`` is
    over all devices (groups must not straddle devices).

    Args:
      rewards: ``[N]`` with ``N`` a multiple of ``group_size``.
      group_size: completions per prompt (keyword-only).
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      eps: :math:`\epsilon`.
      axis_name: optional mapped axis for ``scale="batch"``.

    Returns:
      ``[N]`` float32 advantages (gradient stopped).
    """
    check_choice("scale", scale, GROUP_SCALES)
    check_value("eps", eps, low=0.0)
    g = jax.lax.stop_gradient(_grouped(rewards, group_size))
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (_std_ddof1(g, axis=1, keepdims=True) + eps)
    elif scale == "batch":
        flat = g.reshape(-1)
        if axis_name is None:
            std = _std_ddof1(flat)
        else:
            n = jax.lax.psum(jnp.asarray(flat.size, jnp.float32), axis_name)
            mean = jax.lax.psum(jnp.sum(flat), axis_name) / n
            ss = jax.lax.psum(jnp.sum((flat - mean) ** 2), axis_name)
            std = jnp.sqrt(ss / jnp.maximum(n - 1.0, 1.0))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(
    rewards: chex.Array, *, group_size: int, normalize: bool = False, eps: float = 1e-4
) -> chex.Array:
    r"""REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024), as TRL RLOO.

    .. math::
        A_i = r_i - \frac{1}{k-1}\sum_{j \ne i} r_j = \frac{k}{k-1}\,(r_i - \bar r)

    within each contiguous group of :math:`k` = ``group_size`` completions. With
    ``normalize=True`` the advantages are then standardised over the batch,
    :math:`(A - \mathrm{mean}(A)) / (\mathrm{std}_{\mathrm{ddof}=1}(A) + \epsilon)`, as TRL's
    ``normalize_advantages``.

    Args:
      rewards: ``[N]`` sequence rewards, ``N`` a multiple of ``group_size`` (>= 2).
      group_size: :math:`k` (keyword-only).
      normalize: batch standardisation.
      eps: :math:`\epsilon`.

    Returns:
      ``[N]`` float32 (gradient stopped).
    """
    check_value("eps", eps, low=0.0)
    g = jax.lax.stop_gradient(_grouped(rewards, group_size))
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    adv = (g - baseline).reshape(-1)
    if normalize:
        adv = (adv - jnp.mean(adv)) / (_std_ddof1(adv) + eps)
    return adv


class PenalizedRewards(NamedTuple):
    """Per-token rewards ``[B, T]`` and the per-token KL estimate ``[B, T]`` (0 on padding)."""

    rewards: chex.Array
    kl: chex.Array


def last_token_index(mask: chex.Array) -> chex.Array:
    """Index of the last real token of each row of a ``[B, T]`` mask (0 for an empty row), ``[B]``."""
    check_rank("mask", mask, 2)
    t = mask.shape[1]
    positions = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(as_mask(mask) > 0, positions, 0), axis=1)


def kl_penalized_rewards(
    scores: chex.Array,
    logps: chex.Array,
    ref_logps: chex.Array,
    mask: chex.Array,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> PenalizedRewards:
    r"""Per-token RLHF rewards: KL penalty on every token, the score on the last real token.

    .. math::
        R_{bt} = -\beta\,\mathrm{KL}_{bt}\, m_{bt} + s_b\, 1[t = \mathrm{last}(b)]

    (Ziegler et al. 2019; Stiennon et al. 2020; TRL PPO's ``rewards``), with the KL estimate
    :math:`k_1 = \log\pi - \log\pi_{\mathrm{ref}}`, :math:`k_2 = \tfrac12 (\log\pi -
    \log\pi_{\mathrm{ref}})^2` or :math:`k_3` (``estimator``; Schulman 2020) and
    :math:`\beta` = ``kl_coef`` (a value from :func:`adaptive_kl_controller` may be traced).
    A fully masked row receives no score (its rewards are all 0). Gradients are stopped.

    Args:
      scores: ``[B]`` sequence scores (reward model output).
      logps: ``[B, T]`` policy log-probs of the response tokens.
      ref_logps: ``[B, T]`` reference log-probs.
      mask: ``[B, T]`` right-padded response mask.
      kl_coef: :math:`\beta` (keyword-only).
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      :class:`PenalizedRewards` ``(rewards [B, T], kl [B, T])``.
    """
    check_choice("estimator", estimator, REWARD_KL_ESTIMATORS)
    check_rank("logps", logps, 2)
    check_rank("scores", scores, 1)
    check_value("kl_coef", kl_coef, low=0.0)
    check_same_shape(logps=logps, ref_logps=ref_logps, mask=mask)
    if scores.shape[0] != logps.shape[0]:
        raise ValueError(f"scores.shape={scores.shape} must be ({logps.shape[0]},)")
    sg = jax.lax.stop_gradient
    m = as_mask(mask)
    lp = jnp.where(m > 0, sg(f32(logps)), 0.0)
    ref = jnp.where(m > 0, sg(f32(ref_logps)), 0.0)
    kl = kl_estimate(lp, ref, estimator=estimator) * m
    has_tokens = jnp.sum(m, axis=1) > 0
    last = jax.nn.one_hot(last_token_index(mask), logps.shape[1], dtype=jnp.float32)
    score_term = last * jnp.where(has_tokens, sg(f32(scores)), 0.0)[:, None]
    return PenalizedRewards(rewards=-kl_coef * kl + score_term, kl=kl)
