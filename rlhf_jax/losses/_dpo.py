"""Direct Preference Optimisation and its variants, with TRL DPOTrainer's formulas."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import (
    check_choice,
    check_rank,
    check_same_shape,
    check_value,
    f32,
    is_static_zero,
)
from rlhf_jax.losses._reward import RewardMetrics, reward_metrics

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


_F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                            "discopop")
"""Loss types that take a non-default ``f_divergence`` (as TRL DPOTrainer allows)."""


def _check_sequence_logps(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **extra
) -> None:
    """The four ``[B]`` sequence log-prob arrays (and any ``extra`` ``[B]`` arrays) agree."""
    check_rank("policy_chosen_logps", policy_chosen_logps, 1)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        **extra,
    )


def _f_divergence_scores(logratios: chex.Array, f_divergence: str, f_alpha: float) -> chex.Array:
    """TRL's f-divergence scores f'(pi/pi_ref) of a log-ratio, constants included (they cancel
    in differences but not in the length-normalised ``ipo``/``sigmoid_norm``)."""
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - jnp.exp(-logratios)
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + log sigmoid(log t)
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(a-1) - 1)/(a-1), the exponent clamped at 80 (TRL, float32).
    if abs(f_alpha - 1.0) < 1e-6:
        return logratios
    t = (f_alpha - 1.0) * logratios
    t = jnp.where(t > 80.0, 80.0, t)  # torch.clamp's gradient: 1 up to and at the bound
    return (jnp.exp(t) - 1.0) / (f_alpha - 1.0)


def dpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: chex.Array | float = 0.0,
    chosen_lengths: chex.Array | None = None,
    rejected_lengths: chex.Array | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: chex.Array | float = 0.0,
) -> chex.Array:
    r"""DPO-family loss per preference pair; matches TRL ``DPOTrainer`` for every ``loss_type``.

    Inputs are sequence log-probs (token log-probs summed over each completion, see
    ``sequence_logps``). With the log-ratios
    :math:`\rho_c = \log\pi(y_c) - \log\pi_{\mathrm{ref}}(y_c)`,
    :math:`\rho_r = \log\pi(y_r) - \log\pi_{\mathrm{ref}}(y_r)`, the f-divergence scores
    :math:`s = f'(\rho)` (``f_divergence``):

    * ``reverse_kl`` (standard DPO): :math:`s = \rho`
    * ``forward_kl``: :math:`s = 1 - e^{-\rho}`
    * ``js_divergence``: :math:`s = \log 2 + \log\sigma(\rho)`
    * ``alpha_divergence``: :math:`s = (e^{\min((\alpha-1)\rho,\,80)} - 1) / (\alpha - 1)`
      (:math:`s = \rho` when :math:`|\alpha - 1| < 10^{-6}`), :math:`\alpha` = ``f_alpha``

    (a non-default ``f_divergence`` only with ``sigmoid``, ``sigmoid_norm``, ``hinge``, ``ipo``,
    ``exo_pair``, ``robust`` and ``discopop``, as in TRL; the other losses use :math:`\rho`)
    and :math:`\Delta = s_c - s_r`, :math:`\beta` = ``beta``, :math:`\varepsilon` =
    ``label_smoothing``, the per-pair loss is (``loss_type`` = ..., matches TRL DPOTrainer
    loss_type=...):

    * ``sigmoid`` (DPO, Rafailov et al. 2023):
      :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`.
      With :math:`\varepsilon = 0` (default) this is TRL's ``-logsigmoid(beta * delta)``;
      :math:`\varepsilon > 0` is conservative DPO (cDPO, TRL <= 0.28 ``label_smoothing``), and a
      soft label :math:`p` (probability chosen is preferred) is :math:`\varepsilon = 1 - p`.
    * ``hinge`` (SLiC): :math:`\max(0, 1 - \beta\Delta)`
    * ``ipo`` (Azar et al. 2023, eq. 17, length-normalised as TRL):
      :math:`(s_c / n_c - s_r / n_r - \tfrac{1}{2\beta})^2`, :math:`n = \max(\mathrm{length}, 1)`
    * ``exo_pair`` (EXO, eq. 16): :math:`q_w(\log q_w - \log(1-\varepsilon)) +
      q_l(\log q_l - \log\varepsilon)`, :math:`q_w = \sigma(\beta\Delta)`,
      :math:`q_l = \sigma(-\beta\Delta)`; needs :math:`\varepsilon > 0`
    * ``nca_pair`` (NCA): :math:`-\log\sigma(\beta\rho_c) - \tfrac12\log\sigma(-\beta\rho_c)
      - \tfrac12\log\sigma(-\beta\rho_r)`
    * ``robust`` (rDPO): :math:`\big[-(1-\varepsilon)\log\sigma(\beta\Delta)
      + \varepsilon\log\sigma(-\beta\Delta)\big] / (1 - 2\varepsilon)`,
      :math:`0 \le \varepsilon < 0.5`
    * ``bco_pair`` (BCO): :math:`-\log\sigma(\beta\rho_c - \delta) - \log\sigma(-(\beta\rho_r - \delta))`
      with :math:`\delta` = ``bco_delta``. TRL 1.x uses :math:`\delta = 0` (the default);
      TRL <= 0.28 used the running mean of the rewards, kept explicit here as state by
      :func:`bco_running_mean_init` / :func:`bco_running_mean_update` (pass ``state.mean``).
    * ``sppo_hard`` (SPPO, hard probabilities): :math:`(\rho_c - \tfrac{1}{2\beta})^2 +
      (\rho_r + \tfrac{1}{2\beta})^2`
    * ``aot`` (AOT, paired): :math:`\delta = \mathrm{sort}_B(\log\pi_c - \log\pi_r) -
      \mathrm{sort}_B(\log\pi^{\mathrm{ref}}_c - \log\pi^{\mathrm{ref}}_r)`, loss
      :math:`-(1-\varepsilon)\log\sigma(\beta\delta) - \varepsilon\log\sigma(-\beta\delta)`
      (sorted over the batch, so entry ``b`` is not pair ``b``; f-divergence not used)
    * ``aot_unpaired``: same with :math:`\delta = \mathrm{sort}_B(\rho_c) - \mathrm{sort}_B(\rho_r)`
    * ``apo_zero`` (APO eq. 7): :math:`1 - \sigma(\beta\rho_c) + \sigma(\beta\rho_r)`
    * ``apo_down`` (APO eq. 8): :math:`\sigma(\beta\rho_c) + 1 - \sigma(\beta\Delta)`
    * ``discopop`` (DiscoPOP eq. 5): with :math:`z = \beta\Delta`,
      :math:`w = \sigma(z/\tau)`: :math:`(1-w)(-\log\sigma(z)) + w\,e^{-z}`,
      :math:`\tau` = ``discopop_tau``
    * ``sigmoid_norm``: :math:`-\log\sigma(\beta(s_c / n_c - s_r / n_r))` (length-normalised)

    TRL's ``sft`` loss type is a token cross-entropy on the chosen completion, not a function of
    sequence log-probs: add it yourself (see :func:`mixed_dpo_loss`). Reduce with ``jnp.mean``
    (TRL averages over pairs).

    Args:
      policy_chosen_logps: ``[B]`` policy log-probs of the chosen completions.
      policy_rejected_logps: ``[B]`` policy log-probs of the rejected completions.
      ref_chosen_logps: ``[B]`` reference log-probs of the chosen completions.
      ref_rejected_logps: ``[B]`` reference log-probs of the rejected completions.
      beta: temperature :math:`\beta > 0` (IPO's :math:`\tau`).
      loss_type: one of ``DPO_LOSS_TYPES``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, scalar or ``[B]``; used by ``sigmoid``,
        ``robust`` (:math:`[0, 0.5)`), ``exo_pair`` (:math:`(0, 1)`), ``aot``,
        ``aot_unpaired`` (an error for the others).
      chosen_lengths: ``[B]`` completion token counts (required by ``ipo``, ``sigmoid_norm``).
      rejected_lengths: ``[B]`` completion token counts (required by ``ipo``, ``sigmoid_norm``).
      f_divergence: one of ``F_DIVERGENCES`` (TRL's ``f_divergence_type``).
      f_alpha: :math:`\alpha` of ``alpha_divergence`` (TRL's ``f_alpha_divergence_coef``).
      discopop_tau: :math:`\tau` of ``discopop``.
      bco_delta: :math:`\delta` of ``bco_pair`` (scalar).

    Returns:
      ``[B]`` float32 per-pair losses.

    References:
      Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Ji et al. 2024 (EXO); Chen et al.
      2024 (NCA); Chowdhury et al. 2024 (rDPO); Jung et al. 2024 (BCO); Wu et al. 2024 (SPPO);
      Melnyk et al. 2024 (AOT); D'Oosterlinck et al. 2024 (APO); Chan et al. 2024 (DiscoPOP);
      Wang et al. 2023 (f-DPO).
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    if f_divergence != "reverse_kl" and loss_type not in _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence={f_divergence!r} is not supported by loss_type={loss_type!r}; it "
            f"applies to {', '.join(map(repr, _F_DIVERGENCE_LOSS_TYPES))} (as in TRL)"
        )
    _check_sequence_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps, chosen_lengths=chosen_lengths,
                          rejected_lengths=rejected_lengths)
    if loss_type not in _USES_LABEL_SMOOTHING and not is_static_zero(label_smoothing):
        raise ValueError(
            f"label_smoothing is not used by loss_type={loss_type!r}; it applies to "
            f"{', '.join(map(repr, _USES_LABEL_SMOOTHING))}"
        )
    check_value("beta", beta, low=0.0, low_open=True)
    if loss_type == "robust":
        check_value("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True,
                    requirement="loss_type='robust' needs 0 <= label_smoothing < 0.5")
    elif loss_type == "exo_pair":
        check_value("label_smoothing", label_smoothing, low=0.0, high=1.0, low_open=True,
                    high_open=True,
                    requirement="loss_type='exo_pair' needs 0 < label_smoothing < 1")
    else:
        check_value("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_value("f_alpha", f_alpha)
    check_value("discopop_tau", discopop_tau, low=0.0, low_open=True)
    check_value("bco_delta", bco_delta)
    if loss_type in _LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type={loss_type!r} is length-normalised: pass chosen_lengths and rejected_lengths"
        )
    if loss_type != "bco_pair" and not is_static_zero(bco_delta):
        raise ValueError(f"bco_delta is only used by loss_type='bco_pair', not {loss_type!r}")

    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    rc, rr = f32(ref_chosen_logps), f32(ref_rejected_logps)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    s_c = _f_divergence_scores(chosen_logratios, f_divergence, f_alpha)
    s_r = _f_divergence_scores(rejected_logratios, f_divergence, f_alpha)
    delta = s_c - s_r
    logsig = jax.nn.log_sigmoid

    def smoothed_sigmoid(z):
        return -(1.0 - eps) * logsig(z) - eps * logsig(-z)

    if loss_type == "sigmoid":
        return smoothed_sigmoid(beta * delta)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if loss_type in _LENGTH_NORMALISED:
        n_c = jnp.maximum(f32(chosen_lengths), 1.0)
        n_r = jnp.maximum(f32(rejected_lengths), 1.0)
        norm_delta = s_c / n_c - s_r / n_r
        if loss_type == "ipo":
            return (norm_delta - 1.0 / (2.0 * beta)) ** 2
        return -logsig(beta * norm_delta)
    if loss_type == "exo_pair":
        z = beta * delta
        qw, ql = jax.nn.sigmoid(z), jax.nn.sigmoid(-z)
        return qw * (logsig(z) - jnp.log1p(-eps)) + ql * (logsig(-z) - jnp.log(eps))
    if loss_type == "nca_pair":
        zc, zr = beta * s_c, beta * s_r
        return -logsig(zc) - 0.5 * logsig(-zc) - 0.5 * logsig(-zr)
    if loss_type == "robust":
        z = beta * delta
        return (-(1.0 - eps) * logsig(z) + eps * logsig(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "bco_pair":
        d = f32(bco_delta)
        return -logsig(beta * s_c - d) - logsig(-(beta * s_r - d))
    if loss_type == "sppo_hard":
        return (s_c - 0.5 / beta) ** 2 + (s_r + 0.5 / beta) ** 2
    if loss_type == "aot":
        d = jnp.sort(pc - pr, axis=0) - jnp.sort(rc - rr, axis=0)
        return smoothed_sigmoid(beta * d)
    if loss_type == "aot_unpaired":
        d = jnp.sort(chosen_logratios, axis=0) - jnp.sort(rejected_logratios, axis=0)
        return smoothed_sigmoid(beta * d)
    if loss_type == "apo_zero":
        return 1.0 - jax.nn.sigmoid(beta * chosen_logratios) + jax.nn.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * chosen_logratios) + 1.0 - jax.nn.sigmoid(beta * delta)
    # discopop
    z = beta * delta
    w = jax.nn.sigmoid(z / discopop_tau)
    return (1.0 - w) * (-logsig(z)) + w * jnp.exp(-z)


def mixed_dpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    *,
    loss_weights: Mapping[str, float],
    **dpo_kwargs,
) -> chex.Array:
    r"""Weighted sum of several DPO loss types per pair (MPO-style mixtures).

    .. math:: \mathcal{L} = \sum_k w_k \, \mathcal{L}_{\mathrm{dpo}}^{(k)}

    Its batch mean equals TRL ``DPOTrainer`` with ``loss_type=[...]`` and ``loss_weights=[...]``
    (TRL sums ``w_k * mean(loss_k)``). E.g. MPO (Wang et al. 2024):
    ``loss_weights={"sigmoid": 0.8, "bco_pair": 0.2}`` plus an SFT term added by the caller.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
      loss_weights: ``{loss_type: weight}`` (keyword-only, non-empty).
      **dpo_kwargs: the other keyword arguments of :func:`dpo_loss` (``beta``, lengths, ...),
        shared by all terms. ``label_smoothing`` is passed only to the types that use it.

    Returns:
      ``[B]`` float32.
    """
    if not loss_weights:
        raise ValueError("loss_weights must name at least one loss_type")
    for loss_type, weight in loss_weights.items():
        check_value(f"loss_weights[{loss_type!r}]", weight, low=0.0)
    if "loss_type" in dpo_kwargs:
        raise ValueError("pass the loss types as the keys of loss_weights, not loss_type")
    total = 0.0
    for loss_type, weight in loss_weights.items():
        kwargs = dict(dpo_kwargs)
        if loss_type not in _USES_LABEL_SMOOTHING:
            kwargs.pop("label_smoothing", None)
        if loss_type != "bco_pair":
            kwargs.pop("bco_delta", None)
        total = total + weight * dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            loss_type=loss_type,
            **kwargs,
        )
    return total


def dpo_reward_metrics(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    *,
    beta: float = 0.1,
    label: chex.Array | None = None,
) -> RewardMetrics:
    r"""DPO implicit rewards and their accuracy/margin per pair, as TRL logs them.

    .. math:: r_c = \beta(\log\pi(y_c) - \log\pi_{\mathrm{ref}}(y_c)),\quad
              r_r = \beta(\log\pi(y_r) - \log\pi_{\mathrm{ref}}(y_r)),\quad
              \mathrm{accuracy} = 1[r_c > r_r],\quad \mathrm{margin} = r_c - r_r

    Gradients are stopped (these are metrics). Log the batch means as ``"dpo/rewards_chosen"``,
    ``"dpo/rewards_rejected"``, ``"dpo/accuracy"``, ``"dpo/reward_margin"``.

    Returns:
      :class:`RewardMetrics` of ``[B]`` arrays.
    """
    _check_sequence_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps)
    check_value("beta", beta, low=0.0, low_open=True)
    sg = jax.lax.stop_gradient
    chosen = beta * sg(f32(policy_chosen_logps) - f32(ref_chosen_logps))
    rejected = beta * sg(f32(policy_rejected_logps) - f32(ref_rejected_logps))
    return reward_metrics(chosen, rejected, label=label)


class BCORunningMean(NamedTuple):
    """Running mean of BCO's implicit rewards (``mean``) over ``count`` updates."""

    mean: chex.Array
    count: chex.Array


def bco_running_mean_init() -> BCORunningMean:
    """Initial :class:`BCORunningMean` (mean 0, no updates)."""
    return BCORunningMean(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))


def bco_running_mean_update(
    state: BCORunningMean,
    chosen_rewards: chex.Array,
    rejected_rewards: chex.Array,
    *,
    axis_name: str | None = None,
) -> BCORunningMean:
    r"""Folds one batch into BCO's running reward mean :math:`\delta` (TRL <= 0.28 ``bco_pair``).

    .. math::
        x = \mathrm{mean}([r_c; r_r]),\quad n \leftarrow n + 1,\quad
        \delta \leftarrow \delta + (x - \delta)/n

    with :math:`r = \beta \rho` the implicit rewards (gradient stopped), i.e. TRL's
    ``RunningMoments.update`` fed with the batch-mean reward. Update first, then pass
    ``bco_delta=state.mean`` to :func:`dpo_loss`, as TRL did.

    Args:
      state: current :class:`BCORunningMean`.
      chosen_rewards: ``[B]`` implicit rewards of the chosen completions.
      rejected_rewards: ``[B]`` implicit rewards of the rejected completions.
      axis_name: if given, the batch mean is over all devices of this mapped axis.

    Returns:
      The new state.
    """
    check_rank("chosen_rewards", chosen_rewards, 1)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    rewards = jax.lax.stop_gradient(jnp.concatenate([f32(chosen_rewards), f32(rejected_rewards)]))
    total, n = jnp.sum(rewards), jnp.asarray(rewards.shape[0], jnp.float32)
    if axis_name is not None:
        total, n = jax.lax.psum(total, axis_name), jax.lax.psum(n, axis_name)
    x = total / n
    count = state.count + 1.0
    return BCORunningMean(mean=state.mean + (x - state.mean) / count, count=count)
