"""Reference-free (SimPO, ORPO, CPO) and unpaired (KTO) preference losses."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses._checks import check_choice, check_rank, check_same_shape, check_value, f32

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_pair(policy_chosen_logps: chex.Array, policy_rejected_logps: chex.Array) -> None:
    check_rank("policy_chosen_logps", policy_chosen_logps, 1)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )


def cpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: chex.Array | float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> chex.Array:
    r"""Contrastive Preference Optimisation preference term per pair; matches TRL ``CPOTrainer``.

    With :math:`\Delta = \log\pi(y_c) - \log\pi(y_r)` (or AlphaPO's
    :math:`u(\log\pi(y_c)) - u(\log\pi(y_r))`, :math:`u(\ell) = (1 - e^{-\alpha\ell})/\alpha`
    when ``alpha != 0``):

    * ``sigmoid``: :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`
      (CPO eq. 3)
    * ``hinge``: :math:`\max(0, 1 - \beta\Delta)`
    * ``ipo``: :math:`(\Delta - \tfrac{1}{2\beta})^2`
    * ``simpo``: ``sigmoid`` with :math:`\Delta - \gamma/\beta`, :math:`\gamma` = ``simpo_gamma``

    The full CPO objective is ``mean(cpo_loss) + cpo_alpha * nll(chosen)``; add the
    negative log-likelihood of the chosen completion yourself. TRL feeds length-averaged
    log-probs for ``ipo`` and ``simpo`` and summed ones otherwise.

    Args:
      policy_chosen_logps: ``[B]``.
      policy_rejected_logps: ``[B]``.
      beta: :math:`\beta`.
      loss_type: one of ``CPO_LOSS_TYPES``.
      label_smoothing: :math:`\varepsilon` (``sigmoid`` and ``simpo``).
      simpo_gamma: SimPO's target margin :math:`\gamma`.
      alpha: AlphaPO reward shape; 0 gives plain log-probs.

    Returns:
      ``[B]`` float32.
    """
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    check_value("beta", beta, low=0.0, low_open=True)
    check_value("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_value("simpo_gamma", simpo_gamma)
    check_value("alpha", alpha)
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    if alpha != 0.0:
        pc = (1.0 - jnp.exp(-alpha * pc)) / alpha
        pr = (1.0 - jnp.exp(-alpha * pr)) / alpha
    logits = pc - pr
    eps = jnp.asarray(label_smoothing, jnp.float32)
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        z = beta * logits
        return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * logits)
    return (logits - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    policy_chosen_logps: chex.Array,
    policy_rejected_logps: chex.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: chex.Array | float = 0.0,
) -> chex.Array:
    r"""SimPO loss per pair (Meng et al. 2024); TRL ``CPOTrainer(loss_type="simpo")`` with ``cpo_alpha=0``.

    .. math::
        z = \beta(\bar\ell_c - \bar\ell_r) - \gamma,\qquad
        \mathcal{L} = -(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)

    where :math:`\bar\ell` are **length-averaged** log-probs
    (``sequence_logps(..., average=True)``); no reference model.

    Args:
      policy_chosen_logps: ``[B]`` average per-token log-probs of the chosen completions.
      policy_rejected_logps: ``[B]`` average per-token log-probs of the rejected completions.
      beta: reward scale :math:`\beta`.
      gamma: target reward margin :math:`\gamma` (TRL's ``simpo_gamma``).
      label_smoothing: :math:`\varepsilon`, scalar or ``[B]`` (soft label = :math:`1 - p`).

    Returns:
      ``[B]`` float32.
    """
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
    )


def _log1mexp(x: chex.Array) -> chex.Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    policy_chosen_logps: chex.Array, policy_rejected_logps: chex.Array, *, beta: float = 0.1
) -> chex.Array:
    r"""ORPO odds-ratio term per pair (Hong et al. 2024); matches TRL ``ORPOTrainer``.

    .. math::
        \log\mathrm{odds}(y) = \bar\ell - \log(1 - e^{\bar\ell}),\qquad
        \mathcal{L}_{\mathrm{OR}} = -\beta \log\sigma\big(\log\mathrm{odds}(y_c) - \log\mathrm{odds}(y_r)\big)

    with :math:`\bar\ell` the length-averaged log-probs (``sequence_logps(..., average=True)``).
    The ORPO objective is ``nll(chosen) + mean(orpo_loss)`` (TRL: ``nll - beta * mean(ratio)``);
    the NLL is added by the caller.

    Args:
      policy_chosen_logps: ``[B]`` average per-token log-probs (< 0) of the chosen completions.
      policy_rejected_logps: ``[B]`` of the rejected completions.
      beta: :math:`\beta` (TRL's ``beta``, the paper's :math:`\lambda`).

    Returns:
      ``[B]`` float32.
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    check_value("beta", beta, low=0.0)
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    return -beta * jax.nn.log_sigmoid(log_odds)


def kto_reference_kl(
    kl_policy_logps: chex.Array, kl_ref_logps: chex.Array, *, axis_name: str | None = None
) -> chex.Array:
    r"""KTO's reference point :math:`z_0`, as TRL ``KTOTrainer`` computes it.

    .. math:: z_0 = \max\big(0,\ \mathrm{sg}[\mathrm{mean}_b(\log\pi(y'_b|x_b) - \log\pi_{\mathrm{ref}}(y'_b|x_b))]\big)

    over mismatched pairs :math:`(x_b, y'_b)` (each prompt with another example's completion),
    gradient stopped, clamped at 0; with ``axis_name`` the mean is over all devices.

    Args:
      kl_policy_logps: ``[B]`` policy sequence log-probs of the mismatched completions.
      kl_ref_logps: ``[B]`` reference sequence log-probs of the same.
      axis_name: optional mapped axis for a global mean.

    Returns:
      float32 scalar.
    """
    check_rank("kl_policy_logps", kl_policy_logps, 1)
    check_same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    diff = f32(kl_policy_logps) - f32(kl_ref_logps)
    total, n = jnp.sum(diff), jnp.asarray(diff.shape[0], jnp.float32)
    if axis_name is not None:
        total, n = jax.lax.psum(total, axis_name), jax.lax.psum(n, axis_name)
    return jnp.maximum(jax.lax.stop_gradient(total / jnp.maximum(n, 1.0)), 0.0)


def kto_loss(
    policy_logps: chex.Array,
    ref_logps: chex.Array,
    label: chex.Array,
    *,
    reference_kl: chex.Array | float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> chex.Array:
    r"""KTO loss per (unpaired) example (Ethayarajh et al. 2024); matches TRL ``KTOTrainer``.

    With :math:`\rho = \log\pi(y) - \log\pi_{\mathrm{ref}}(y)` and :math:`z_0` =
    ``reference_kl`` (see :func:`kto_reference_kl`):

    .. math::
        \mathcal{L}_{\mathrm{desirable}} = \lambda_D\,(1 - \sigma(\beta(\rho - z_0))),\qquad
        \mathcal{L}_{\mathrm{undesirable}} = \lambda_U\,(1 - \sigma(\beta(z_0 - \rho)))

    (``loss_type="apo_zero_unpaired"``: :math:`\lambda_D(1 - \sigma(\beta\rho))` and
    :math:`\lambda_U\sigma(\beta\rho)`). The example's loss is
    :math:`p\,\mathcal{L}_{\mathrm{desirable}} + (1 - p)\,\mathcal{L}_{\mathrm{undesirable}}` with
    :math:`p` = ``label`` (1 desirable, 0 undesirable; soft labels in between). TRL's loss is the
    mean over the batch.

    Args:
      policy_logps: ``[B]`` policy sequence log-probs.
      ref_logps: ``[B]`` reference sequence log-probs.
      label: ``[B]`` 1 desirable / 0 undesirable (float or bool).
      reference_kl: :math:`z_0` (scalar; keyword-only).
      beta: :math:`\beta`.
      desirable_weight: :math:`\lambda_D`.
      undesirable_weight: :math:`\lambda_U`.
      loss_type: one of ``KTO_LOSS_TYPES``.

    Returns:
      ``[B]`` float32.
    """
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_rank("policy_logps", policy_logps, 1)
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, label=label)
    check_value("beta", beta, low=0.0, low_open=True)
    check_value("desirable_weight", desirable_weight, low=0.0)
    check_value("undesirable_weight", undesirable_weight, low=0.0)
    check_value("label", label, low=0.0, high=1.0)
    check_value("reference_kl", reference_kl)
    rho = f32(policy_logps) - f32(ref_logps)
    z0 = f32(reference_kl)
    p = f32(label)
    if loss_type == "kto":
        desirable = 1.0 - jax.nn.sigmoid(beta * (rho - z0))
        undesirable = 1.0 - jax.nn.sigmoid(beta * (z0 - rho))
    else:
        desirable = 1.0 - jax.nn.sigmoid(beta * rho)
        undesirable = jax.nn.sigmoid(beta * rho)
    return p * desirable_weight * desirable + (1.0 - p) * undesirable_weight * undesirable
