"""Offline losses for ReST's Improve step: filtered (optionally reward-weighted) behaviour cloning,
GOLD's importance-weighted likelihood and V-MPO's weighted likelihood with its temperature dual."""

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
    static_value,
)

REST_WEIGHTINGS = ("none", "reward", "exp")

_sg = jax.lax.stop_gradient


class ReSTLoss(NamedTuple):
    """Filtered behaviour cloning per token.

    Attributes:
      loss: ``[B, T]`` per-token weighted negative log-likelihood, 0 on padding and on the
        samples the filter drops.
      mask: ``[B, T]`` the token mask restricted to kept samples: reduce ``loss`` with it,
        e.g. ``aggregate_loss(out.loss, out.mask, mode="bnpo")`` (a token mean over the
        filtered set, the SFT trainer's reduction) or ``mode="grpo"`` (sequence means).
      weights: ``[B]`` the per-sample weights (0 on dropped samples), gradient stopped.
      kept: ``[B]`` 1.0 on samples that pass the filter and have at least one token.
    """

    loss: chex.Array
    mask: chex.Array
    weights: chex.Array
    kept: chex.Array


def rest_bc_loss(
    token_logps: chex.Array,
    mask: chex.Array,
    rewards: chex.Array,
    *,
    threshold: float | None = None,
    weighting: str = "none",
    temperature: float = 1.0,
) -> ReSTLoss:
    r"""ReST's Improve-step loss: behaviour cloning on the samples whose reward passes the
    threshold (Gulcehre et al. 2023), optionally reward-weighted.

    ReST fine-tunes on the Grow samples with :math:`J(\theta) = \mathbb{E}_{(x,y)}[F(x, y;
    \tau)\,\mathcal{L}(x, y; \theta)]`, the filter :math:`F = \mathbb{1}[R(x, y) > \tau]`
    (strictly above, as the paper writes it) and :math:`\mathcal{L}` the negative
    log-likelihood; the thresholds grow over Improve steps. Per token:

    .. math::
        \mathcal{L}_{bt} = -w_b\,\log\pi(y_{bt} \mid x_b, y_{b,<t})\quad
        \text{on kept samples' tokens}

    with the weights (gradient stopped), :math:`k_b` = 1 on kept samples:

    * ``"none"`` (ReST's BC, the default): :math:`w_b = k_b`.
    * ``"reward"``: :math:`w_b = k_b R_b`, likelihood weighted by the reward; with binary
      rewards and no threshold this is ReST-EM's :math:`\mathbb{E}[r \log\pi(y \mid x)]`.
      Meant for rewards :math:`\ge 0` (scores in :math:`[0, 1]`, binary rewards): a negative
      weight would push the sample's likelihood down, so filter with ``threshold >= 0``.
    * ``"exp"``: reward-weighted regression, self-normalised over the kept samples of the
      batch: :math:`w_b = k_b\,e^{R_b/\beta} / \mathrm{mean}_{k}(e^{R/\beta})` (mean weight 1,
      invariant to a shift of the rewards), :math:`\beta` = ``temperature``.

    The weights are normalised over the batch given (under ``jit`` with sharded arrays that is
    the global batch). Samples without any real token are never kept. ``threshold=None``
    keeps every sample (plain SFT on the Grow set when ``weighting="none"``).

    Args:
      token_logps: ``[B, T]`` policy log-probs of the sampled response tokens.
      mask: ``[B, T]`` 1 on response tokens (float or bool).
      rewards: ``[B]`` one reward per sample.
      threshold: :math:`\tau`, or ``None`` for no filter.
      weighting: one of ``REST_WEIGHTINGS``.
      temperature: :math:`\beta > 0` of ``"exp"`` (an error with the other weightings unless 1).

    Returns:
      :class:`ReSTLoss`. Padded positions and dropped samples get exactly zero gradient.

    References:
      Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling";
      Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving with
      Language Models" (ReST-EM); Peters & Schaal 2007 (reward-weighted regression).
    """
    check_choice("weighting", weighting, REST_WEIGHTINGS)
    check_value("temperature", temperature, low=0.0, low_open=True)
    if weighting != "exp" and static_value(temperature) != 1.0:
        raise ValueError(f"temperature is only used by weighting='exp', not {weighting!r}")
    check_rank("token_logps", token_logps, 2)
    check_same_shape(token_logps=token_logps, mask=mask)
    check_rank("rewards", rewards, 1)
    if rewards.shape[0] != token_logps.shape[0]:
        raise ValueError(
            f"rewards must have shape ({token_logps.shape[0]},), got {rewards.shape}"
        )
    m = as_mask(mask)
    r = _sg(f32(rewards))
    kept = jnp.sum(m, axis=-1) > 0
    if threshold is not None:
        kept = kept & (r > threshold)
    r = jnp.where(kept, r, 0.0)  # a dropped sample's reward (even NaN) never reaches a weight
    k = kept.astype(jnp.float32)
    if weighting == "none":
        w = k
    elif weighting == "reward":
        w = jnp.where(kept, r, 0.0)
    else:
        scaled = jnp.where(kept, r / temperature, -jnp.inf)
        shift = jnp.max(jnp.where(kept, scaled, jnp.finfo(jnp.float32).min))
        e = jnp.where(kept, jnp.exp(scaled - shift), 0.0)
        w = e * jnp.sum(k) / jnp.maximum(jnp.sum(e), jnp.finfo(jnp.float32).tiny)
    w = _sg(w)
    token_mask = m * k[:, None]
    loss = jnp.where(token_mask > 0, -w[:, None] * f32(token_logps) * token_mask, 0.0)
    return ReSTLoss(loss=loss, mask=token_mask, weights=w, kept=k)


def gold_loss(
    token_logps: chex.Array,
    mask: chex.Array,
    returns: chex.Array,
    *,
    importance_logps: chex.Array | None = None,
    min_importance_weight: float = 0.2,
) -> chex.Array:
    r"""GOLD's off-policy likelihood per token (Pang & He 2021), one of the offline losses ReST
    compared with behaviour cloning.

    GOLD treats fixed sequences as off-policy trajectories and follows the policy gradient
    with the trajectory's importance weight approximated token by token by the policy's own
    probability, bounded below by :math:`u`:

    .. math::
        \mathcal{L}_{bt} = -\mathrm{sg}\big[\mathrm{clip}(\tilde\pi(y_{bt}), u, 1)\, Q_{bt}\big]\,
            \log\pi(y_{bt} \mid x_b, y_{b,<t})

    with :math:`\tilde\pi` = ``exp(importance_logps)`` (default: the current policy's own
    log-probs, gradient stopped; the GOLD code uses a lagged copy it refreshes periodically),
    :math:`u` = ``min_importance_weight`` (the code's ``--iw-min``, 0.2 in its IWSLT script)
    and :math:`Q` = ``returns``. In ReST the return is the sample's reward, the same at every
    token (terminal reward, no discount): pass ``returns`` as ``[B]``. GOLD's own returns are
    built from a fixed MLE model's token probabilities: pass them as ``[B, T]``. The weight is
    also clipped at 1, as the code clamps it (it binds only for inputs above 0, which are not
    log-probs).

    Args:
      token_logps: ``[B, T]`` policy log-probs of the sequence tokens.
      mask: ``[B, T]`` 1 on scored tokens.
      returns: ``[B]`` (broadcast over tokens) or ``[B, T]`` returns :math:`Q`.
      importance_logps: optional ``[B, T]`` log-probs of :math:`\tilde\pi`.
      min_importance_weight: :math:`u \in [0, 1]`.

    Returns:
      ``[B, T]`` float32, 0 on padding (exactly zero gradient there). Reduce with
      ``aggregate_loss`` or ``masked_mean`` over ``mask``.

    References:
      Pang & He 2021, "Text Generation by Learning from Demonstrations" (ICLR 2021),
      github.com/yzpang/gold-off-policy-text-gen-iclr21; Gulcehre et al. 2023 (ReST).
    """
    check_value("min_importance_weight", min_importance_weight, low=0.0, high=1.0)
    check_rank("token_logps", token_logps, 2)
    check_same_shape(token_logps=token_logps, mask=mask, importance_logps=importance_logps)
    check_rank("returns", returns, {1, 2})
    if returns.ndim == 1:
        if returns.shape[0] != token_logps.shape[0]:
            raise ValueError(
                f"returns must have shape ({token_logps.shape[0]},) or {token_logps.shape}, got "
                f"{returns.shape}"
            )
        q = f32(returns)[:, None]
    else:
        check_same_shape(token_logps=token_logps, returns=returns)
        q = f32(returns)
    m = as_mask(mask)
    logp = jnp.where(m > 0, f32(token_logps), 0.0)
    behaviour = logp if importance_logps is None else jnp.where(m > 0, f32(importance_logps), 0.0)
    weight = jnp.clip(jnp.exp(behaviour), min_importance_weight, 1.0)
    weight = _sg(jnp.where(m > 0, weight * q, 0.0))
    return jnp.where(m > 0, -weight * logp * m, 0.0)


class VMPOOutput(NamedTuple):
    """V-MPO's terms.

    Attributes:
      policy_loss: ``[B]`` :math:`-N\\psi_b \\log\\pi(y_b)`, :math:`N` the number of valid
        examples, so that its mean over the valid examples is the M-step loss
        :math:`-\\sum_b \\psi_b \\log\\pi(y_b)` (rlax's convention); 0 on unselected examples.
      temperature_loss: scalar, the E-step dual; differentiate it with respect to the
        temperature.
      kl_loss: ``[B]`` :math:`\\mathrm{sg}[\\alpha]\\,\\mathrm{KL}_b` (0 without ``kl``).
      multiplier_loss: ``[B]`` :math:`\\alpha(\\varepsilon_\\alpha - \\mathrm{sg}[\\mathrm{KL}_b])`
        (0 without ``kl``).
      weights: ``[B]`` :math:`\\psi` (sum to 1 over the selected examples), gradient stopped.
      selected: ``[B]`` 1.0 on the examples in the top ``top_fraction`` by advantage.
    """

    policy_loss: chex.Array
    temperature_loss: chex.Array
    kl_loss: chex.Array
    multiplier_loss: chex.Array
    weights: chex.Array
    selected: chex.Array


def vmpo_loss(
    sequence_logps: chex.Array,
    advantages: chex.Array,
    temperature: chex.Array | float,
    *,
    mask: chex.Array | None = None,
    epsilon_temperature: float = 0.1,
    top_fraction: float = 0.5,
    kl: chex.Array | None = None,
    kl_multiplier: chex.Array | float | None = None,
    epsilon_kl: float = 0.01,
) -> VMPOOutput:
    r"""V-MPO's loss on sampled sequences (Song et al. 2019), the family of ReST's BVMPO.

    Each sample :math:`y_b` of prompt :math:`x_b` is one action with log-prob
    :math:`\log\pi(y_b \mid x_b)` (``sequence_logps``) and advantage :math:`A_b` (e.g. the
    reward minus a per-prompt or learned baseline; gradient stopped). With :math:`\mathcal{S}`
    the valid examples whose advantage is among the top ``top_fraction`` (at least one; ties
    at the cut-off are all kept, as rlax) and :math:`\eta` = ``temperature``:

    .. math::
        \psi_b = \frac{e^{A_b/\eta}}{\sum_{b' \in \mathcal{S}} e^{A_{b'}/\eta}}\ (b \in
        \mathcal{S}),\qquad
        \mathcal{L}_\pi = -\sum_{b \in \mathcal{S}} \mathrm{sg}[\psi_b]\log\pi(y_b)

        \mathcal{L}_\eta = \eta\,\varepsilon_\eta + \eta\log\Big(\frac{1}{|\mathcal{S}|}
        \sum_{b \in \mathcal{S}} e^{A_b/\eta}\Big)

    and, with a per-example ``kl`` (e.g. the summed ``kl_from_logits`` from the policy that
    generated the data, V-MPO's trust region) and its Lagrange multiplier :math:`\alpha` =
    ``kl_multiplier``: :math:`\mathcal{L}_{\mathrm{KL}} = \mathrm{sg}[\alpha]\,\mathrm{KL}`,
    :math:`\mathcal{L}_\alpha = \alpha(\varepsilon_\alpha - \mathrm{sg}[\mathrm{KL}])`.
    The total is ``masked_mean(policy_loss + kl_loss + multiplier_loss, mask) +
    temperature_loss``. Keep :math:`\eta, \alpha > 0` by parametrising them (e.g.
    ``softplus(param) + 1e-8``) and train those parameters on the same loss.

    The ReST paper found plain BC ahead of the offline RL losses it tried (BVMPO, GOLD,
    offline actor-critic) on its translation tasks. V-MPO's hyper-parameters are not given there: :math:`\varepsilon_\eta`,
    :math:`\varepsilon_\alpha` here are starting points to tune. The weights are normalised
    over the batch given (under ``jit`` with sharded arrays, the global batch; under
    ``shard_map`` gather the advantages first).

    Args:
      sequence_logps: ``[B]`` policy log-probs of the samples (``sequence_logps``).
      advantages: ``[B]`` advantages :math:`A` (gradient stopped inside).
      temperature: :math:`\eta > 0`, a scalar (an array when learned).
      mask: optional ``[B]`` 1 on real examples.
      epsilon_temperature: :math:`\varepsilon_\eta > 0`.
      top_fraction: fraction of the valid examples kept, in :math:`(0, 1]` (V-MPO: 0.5).
      kl: optional ``[B]`` per-example KL to the data-generating policy.
      kl_multiplier: :math:`\alpha > 0`, scalar; required with ``kl``.
      epsilon_kl: :math:`\varepsilon_\alpha > 0`.

    Returns:
      :class:`VMPOOutput`.

    References:
      Song et al. 2019, "V-MPO: On-Policy Maximum a Posteriori Policy Optimization for Discrete
      and Continuous Control" (ICLR 2020); rlax ``vmpo_loss``; Gulcehre et al. 2023 (ReST).
    """
    check_value("temperature", temperature, low=0.0, low_open=True)
    check_value("epsilon_temperature", epsilon_temperature, low=0.0, low_open=True)
    check_value("top_fraction", top_fraction, low=0.0, high=1.0, low_open=True)
    check_value("epsilon_kl", epsilon_kl, low=0.0, low_open=True)
    if (kl is None) != (kl_multiplier is None):
        raise ValueError("pass kl and kl_multiplier together (V-MPO's KL constraint) or neither")
    if kl_multiplier is not None:
        check_value("kl_multiplier", kl_multiplier, low=0.0, low_open=True)
        check_rank("kl_multiplier", kl_multiplier, 0)
    check_rank("temperature", temperature, 0)
    check_rank("sequence_logps", sequence_logps, 1)
    check_same_shape(sequence_logps=sequence_logps, advantages=advantages, mask=mask, kl=kl)
    b = sequence_logps.shape[0]
    valid = jnp.ones((b,), bool) if mask is None else as_mask(mask) > 0
    n_valid = jnp.sum(valid).astype(jnp.float32)
    eta = f32(temperature)
    adv = _sg(jnp.where(valid, f32(advantages), 0.0))  # NaN on padding cannot reach eta's grad

    # Top-k of the valid advantages (the order does not depend on eta > 0).
    k = jnp.maximum(jnp.floor(top_fraction * n_valid), 1.0).astype(jnp.int32)
    ranked = jnp.sort(jnp.where(valid, adv, -jnp.inf))[::-1]
    cutoff = jnp.take(ranked, jnp.minimum(k, b) - 1)
    selected = valid & (adv >= cutoff)
    n_sel = jnp.sum(selected).astype(jnp.float32)

    scaled = jnp.where(selected, adv / eta, -jnp.inf)
    # The shift only stabilises exp; 0 when nothing is selected keeps every branch finite.
    shift = _sg(jnp.where(n_sel > 0, jnp.max(jnp.where(selected, scaled, -jnp.inf)), 0.0))
    e = jnp.where(selected, jnp.exp(scaled - shift), 0.0)
    total = jnp.sum(e)
    psi = _sg(e / jnp.maximum(total, jnp.finfo(jnp.float32).tiny))
    logp = jnp.where(valid, f32(sequence_logps), 0.0)
    policy_loss = -psi * n_valid * logp
    log_mean = jnp.log(jnp.maximum(total, jnp.finfo(jnp.float32).tiny)) + shift - jnp.log(
        jnp.maximum(n_sel, 1.0))
    temperature_loss = jnp.where(n_sel > 0, eta * (epsilon_temperature + log_mean), 0.0)

    if kl is None:
        kl_loss = multiplier_loss = jnp.zeros((b,), jnp.float32)
    else:
        alpha = f32(kl_multiplier)
        kl_v = jnp.where(valid, f32(kl), 0.0)
        kl_loss = jnp.where(valid, _sg(alpha) * kl_v, 0.0)
        multiplier_loss = jnp.where(valid, alpha * (epsilon_kl - _sg(kl_v)), 0.0)
    return VMPOOutput(policy_loss=policy_loss, temperature_loss=temperature_loss,
                      kl_loss=kl_loss, multiplier_loss=multiplier_loss, weights=psi,
                      selected=selected.astype(jnp.float32))
